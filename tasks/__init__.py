"""SeqIO Task and Mixture registrations for GenSAR (search, recommendation, alignment).

    from gensar_tasks import register_gensar
    registration = register_gensar(prepared_dir, identifiers_dir, vocab_path)

Modules: prompts (templates, no TensorFlow), sources (SeqIO data sources), preprocessors
(tf.data rendering of prompts and targets), metrics (postprocessors, ranking metrics),
gensar (registration of tasks and mixtures), corpus (the vocabulary's training text),
show (CLI: decoded examples and length statistics per task).

The repository's tasks/ folder is installed as this package, `gensar_tasks` (setup.py's
package_dir), so it does not claim the generic top-level name `tasks`.
"""
if __name__ != "gensar_tasks":
  # Imported as the bare folder (`import tasks` with the repository root on sys.path), every
  # module here would exist twice and gin would register each configurable twice.
  raise ImportError("the tasks/ folder is the package gensar_tasks: import gensar_tasks, "
                    f"not {__name__} (pip install -e . installs it)")

# pylint: disable=g-import-not-at-top,wrong-import-position
from gensar_tasks.gensar import (GensarRegistration, gensar_mixture, mixture_rates,  # noqa: E402
                                 register_gensar)

__all__ = ["GensarRegistration", "gensar_mixture", "mixture_rates", "register_gensar"]
