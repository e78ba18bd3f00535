"""SeqIO Task and Mixture registrations for GenSAR (search, recommendation, alignment).

    from tasks import register_gensar
    registration = register_gensar(prepared_dir, identifiers_dir, vocab_path)

Modules: prompts (templates, no TensorFlow), sources (SeqIO data sources), preprocessors
(tf.data rendering of prompts and targets), metrics (postprocessors, ranking metrics),
gensar (registration of tasks and mixtures), corpus (the vocabulary's training text),
show (CLI: decoded examples and length statistics per task).
"""
from tasks.gensar import (GensarRegistration, gensar_mixture, mixture_rates,
                          register_gensar)

__all__ = ["GensarRegistration", "gensar_mixture", "mixture_rates", "register_gensar"]
