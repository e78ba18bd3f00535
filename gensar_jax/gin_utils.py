"""The T5X command-line convention for every entry point.

  python -m gensar_jax.<stage> --gin_file=gin/runs/x.gin --gin_file=gin/models/tiny.gin \
      --gin.MODEL_DIR="'runs/tiny'" --gin.TRAIN_STEPS=100

`--gin.NAME=value` is shorthand for the binding `NAME = value` (values are gin literals, so
strings need inner quotes); `--gin_bindings=...` is accepted too. Gin files may `include`
others by paths relative to the repository root or the current directory.
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gin

from gensar_jax import stages
from gensar_jax.errors import GensarError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FlagError(GensarError):
  """A command line gin cannot use: a missing file, an unparsable value, an unknown macro.
  `run` prints it as one line and exits with code 2."""


def parse_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(gin files, bindings) from T5X-style flags; anything else is an error."""
  files, bindings = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg.partition("=")
    if not eq and i + 1 < len(args) and name in ("--gin_file", "--gin_bindings"):
      value, i = args[i + 1], i + 1
    elif not eq:
      raise SystemExit(f"unrecognised argument {arg!r}: expected --gin_file=PATH, "
                       "--gin.NAME=VALUE or --gin_bindings=BINDING")
    if name == "--gin_file":
      files.append(value)
    elif name == "--gin_bindings":
      bindings.append(value)
    elif name.startswith("--gin."):
      bindings.append(f"{name[len('--gin.'):]} = {value}")
    else:
      raise SystemExit(f"unrecognised flag {name!r}: expected --gin_file, --gin.NAME or "
                       "--gin_bindings")
    i += 1
  return files, bindings


def parse_gin(argv: Sequence[str], skip_unknown: bool = False) -> None:
  """Parses gin files and bindings given on the command line (after importing modules)."""
  files, bindings = parse_gin_flags(argv)
  for path in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(path)
  for f in files:
    if not any(os.path.exists(os.path.join(p, f)) for p in ("", os.getcwd(), REPO_ROOT)):
      raise FlagError(f"--gin_file={f}: file not found (looked in . and {REPO_ROOT})")
  _check_macro_bindings(files, bindings)  # first: a typo would surface as "X is required"
  try:
    _parse_retrying(files, bindings, skip_unknown)
  except SyntaxError as e:
    raise FlagError(_syntax_error_line(e, bindings)) from None
  except ValueError as e:
    message = _unknown_name_line(e, bindings)
    if message is None:
      raise
    raise FlagError(message) from None
  _check_binding_types(bindings)


def _parse_retrying(files: Sequence[str], bindings: Sequence[str], skip_unknown: bool) -> None:
  try:
    gin.parse_config_files_and_bindings(files, bindings, skip_unknown=skip_unknown)
  except (SystemError, SyntaxError) as e:
    # CPython 3.11 before 3.11.8 can fail `ast.literal_eval` (which gin parses values
    # with, reporting a SyntaxError) with this spurious error while another thread
    # compiles code (gh-106905); parsing again is safe: every binding is set once more.
    if "recursion depth mismatch" not in str(e):
      raise
    gin.parse_config_files_and_bindings(files, bindings, skip_unknown=skip_unknown)


def _syntax_error_line(error: SyntaxError, bindings: Sequence[str]) -> str:
  """One line naming the flag gin could not parse (its own error is a long traceback)."""
  where = getattr(error, "filename", None) or ""
  for binding in bindings:
    try:
      with gin.unlock_config():
        gin.parse_config([binding], skip_unknown=True)
    except SyntaxError:
      name, _, value = binding.partition(" = ")
      hint = ""
      if value and value[:1] not in "'\"[({%@-0123456789" and value not in ("True", "False",
                                                                           "None"):
        hint = f"; a string needs inner quotes: --gin.{name}=\"'{value}'\""
      return f"--gin.{name}={value}: not a gin value{hint}"
    except Exception:  # pylint: disable=broad-except  # other problems are gin's to report
      continue
  first = str(error).strip().splitlines()[-1] if str(error).strip() else "syntax error"
  return f"gin syntax error{f' in {where}' if where and where != '<string>' else ''}: {first}"


_UNKNOWN_PARAMETER = re.compile(r"Configurable '([\w.]+)' doesn't have a parameter named "
                                r"'(\w+)'")
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching '([\w.]+)'")


def _flag(binding: str) -> str:
  """The command-line spelling of a binding: --gin.NAME=VALUE."""
  name, _, value = binding.partition(" = ")
  return f"--gin.{name.strip()}={value.strip()}"


def _unknown_name_line(error: ValueError, bindings: Sequence[str]) -> Optional[str]:
  """One line for gin's "no such configurable / parameter" parse errors (a typo such as
  --gin.train.stepz=5), naming the flag or the gin file line and the nearest real name;
  None for any other error."""
  text = str(error)
  parameter = _UNKNOWN_PARAMETER.search(text)
  configurable = _UNKNOWN_CONFIGURABLE.search(text)
  if not parameter and not configurable:
    return None
  source = text.strip().splitlines()[-1].strip()   # gin ends with the offending line
  flag = next((_flag(b) for b in bindings if b.strip() == source), None)
  where = flag or " ".join(line.strip() for line in text.splitlines()[1:2]) or "gin"
  if parameter:
    name, param = parameter.groups()
    try:
      fn = gin.config._REGISTRY.get_match(name).wrapped  # pylint: disable=protected-access
      known = list(inspect.signature(fn).parameters)
    except Exception:  # pylint: disable=broad-except  # a suggestion is optional
      known = []
    close = difflib.get_close_matches(param, known, n=1, cutoff=0.5)
    hint = f"; did you mean {name}.{close[0]}?" if close else ""
    return f"{where}: {name} has no parameter {param!r}{hint}"
  name = configurable.group(1)
  return f"{where}: no configurable named {name!r} (a typo, or its module is not imported)"


def _macro_targets() -> Dict[str, List[Tuple[str, str]]]:
  """{macro name: [(configurable selector, parameter)]} for every parameter whose bound
  value is `%MACRO` itself, through chains of macros (`X = %TRAIN_STEPS`).

  Reads gin's binding table, which gin 0.5 (pinned in setup.py) keeps in
  `gin.config._CONFIG` as {(scope, selector): {parameter: value}}; macros are the selector
  "gin.macro" with the parameter "value".
  """
  direct: Dict[str, List[Tuple[str, str]]] = {}
  for (scope, selector), parameters in gin.config._CONFIG.items():  # pylint: disable=protected-access
    for parameter, value in parameters.items():
      if isinstance(value, gin.config.ConfigurableReference) and \
          value.configurable.selector == "gin.macro":
        macro = value.scoped_selector.split("/")[0]
        target = (f"%{scope}", "") if selector == "gin.macro" else (selector, parameter)
        direct.setdefault(macro, []).append(target)
  resolved: Dict[str, List[Tuple[str, str]]] = {}

  def resolve(macro: str, seen: frozenset) -> List[Tuple[str, str]]:
    out = []
    for selector, parameter in direct.get(macro, []):
      if selector.startswith("%"):
        if selector[1:] not in seen:
          out += resolve(selector[1:], seen | {selector[1:]})
      else:
        out.append((selector, parameter))
    return out

  for macro in direct:
    resolved[macro] = resolve(macro, frozenset([macro]))
  return resolved


def binding_targets(bindings: Sequence[str]) -> Dict[str, Tuple[object, List[Tuple[str, str]]]]:
  """{flag: (its parsed value, [(configurable selector, parameter) it sets])} for the
  command-line bindings, after parsing: which parameters a flag's value reaches, directly
  (--gin.train.train_steps=5) or through macros (--gin.TRAIN_STEPS=5)."""
  macros = _macro_targets()
  config = gin.config._CONFIG  # pylint: disable=protected-access
  out = {}
  last = {b.partition(" = ")[0].strip(): b for b in bindings}  # a later flag overrides
  for binding in last.values():
    name = binding.partition(" = ")[0].strip()
    if "." in name:
      scoped, _, parameter = name.rpartition(".")
      scope, _, selector = scoped.rpartition("/")
      try:
        selector = gin.config._REGISTRY.get_match(selector).selector  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        continue
      value = config.get((scope, selector), {}).get(parameter)
      out[_flag(binding)] = (value, [(selector, parameter)])
    elif (name, "gin.macro") in config:
      out[_flag(binding)] = (config[(name, "gin.macro")]["value"], macros.get(name, []))
  return out


def _accepts(value, hint) -> bool:
  """Whether a gin value can be the annotated type. Only the plain kinds a flag sets are
  judged (numbers, strings, booleans, mappings, sequences, Optional/Union/Literal of
  them); anything else (callables, classes, references) passes."""
  import collections.abc
  import typing
  if isinstance(value, gin.config.ConfigurableReference):
    return True
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union:
    return any(_accepts(value, a) for a in args)
  if origin is typing.Literal:
    return value in args
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  base = origin or hint
  if base in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
    return isinstance(value, collections.abc.Mapping)
  if base in (list, tuple):
    return isinstance(value, (list, tuple))
  if base is collections.abc.Sequence:   # a string is a sequence too
    return isinstance(value, (list, tuple, str))
  return True


def _type_name(hint) -> str:
  """`int`, `Optional[str]`, `Mapping[str, int]`: the annotation as written."""
  if isinstance(hint, type):
    return hint.__name__
  return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _check_binding_types(bindings: Sequence[str]) -> None:
  """A flag's value must fit the annotation of every parameter it sets: a string where
  an int belongs (--gin.TRAIN_STEPS='abc') would otherwise fail deep inside a configurable
  with a TypeError traceback, or not at all."""
  import typing
  for flag, (value, targets) in binding_targets(bindings).items():
    for selector, parameter in targets:
      try:
        fn = gin.config._REGISTRY.get_match(selector).wrapped  # pylint: disable=protected-access
        fn = fn.__init__ if inspect.isclass(fn) else fn
        hints = typing.get_type_hints(fn)
        default = inspect.signature(fn).parameters[parameter].default
      except Exception:  # pylint: disable=broad-except  # unresolvable annotations: not judged
        continue
      hint = hints.get(parameter)
      if hint is None or _accepts(value, hint) or (value is None and default is None):
        continue
      short = selector.rsplit(".", 1)[-1]
      if value is None:  # how a gin value is left unset
        name = flag[len("--gin."):].partition("=")[0]
        raise FlagError(f"{flag}: {name} is required ({short}.{parameter} takes "
                        f"{_type_name(hint)}, not None)")
      raise FlagError(f"{flag}: {short}.{parameter} takes {_type_name(hint)}, not "
                      f"{type(value).__name__} {value!r}")


def flag_of_failure(error: Exception, targets) -> Optional[str]:
  """The command-line flag behind a ValueError that a configurable raised itself while
  checking its arguments (`decay_steps=-5 must be >= 1` from --gin.TRAIN_STEPS=-5), else
  None. Only an error raised in the configurable's own body counts: one from deeper down
  is a bug and keeps its traceback."""
  match = re.search(r"In call to configurable '([\w.]+)'", str(error))
  if not match or not isinstance(error, ValueError):
    return None
  try:
    fn = gin.config._REGISTRY.get_match(match.group(1)).wrapped  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return None
  fn = inspect.unwrap(fn.__init__ if inspect.isclass(fn) else fn)
  tb = error.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  if tb is None or tb.tb_frame.f_code is not getattr(fn, "__code__", None):
    return None
  selector = gin.config._REGISTRY.get_match(match.group(1)).selector  # pylint: disable=protected-access
  return next((flag for flag, (_, reached) in targets.items()
               if any(s == selector for s, _ in reached)), None)


def _gin_texts(files: Sequence[str]) -> List[str]:
  """The text of every gin file named and of every file they include (best effort)."""
  texts, pending, seen = [], list(files), set()
  while pending:
    name = pending.pop()
    for base in ("", os.getcwd(), REPO_ROOT):
      path = os.path.join(base, name)
      if os.path.isfile(path):
        break
    else:
      continue
    path = os.path.abspath(path)
    if path in seen:
      continue
    seen.add(path)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    texts.append(text)
    pending += re.findall(r"^\s*include\s+['\"]([^'\"]+)['\"]", text, flags=re.M)
  return texts


def _check_macro_bindings(files: Sequence[str], bindings: Sequence[str]) -> None:
  """A `--gin.NAME=value` macro that no gin file uses is a typo, not a new setting: gin
  would accept it silently and the run would start with the default."""
  texts = _gin_texts(files)
  known = set()
  for text in texts + list(bindings):
    known.update(re.findall(r"%([A-Za-z_]\w*)", text))  # referenced
  for text in texts:
    known.update(re.findall(r"^\s*([A-Za-z_]\w*)\s*=", text, flags=re.M))  # declared
  for binding in bindings:
    name = binding.partition(" = ")[0].strip()
    if "." in name or "/" in name or name in known:
      continue
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise FlagError(f"--gin.{name}: no gin file given declares or uses the macro "
                    f"{name}{hint}")


# Gin's words for a required value left unset: a `%gin.REQUIRED` macro (at parse time) and
# a configurable's gin.REQUIRED argument (at call time).
_UNSET_MACRO = re.compile(r"(\w+)/macro\.value set to `%gin\.REQUIRED`")
_UNSET_ARGUMENT = re.compile(r"Required bindings for `([\w.]+)` not provided in config: "
                             r"\[([^\]]*)\]")


def user_message(error: Exception) -> str:
  """The error's own text, without the "In call to configurable ..." line gin appends to an
  exception raised inside a configurable (the user needs what went wrong, not the wrapper)."""
  return str(error).split("\n  In call to configurable", 1)[0]


def missing_binding_message(error: Exception) -> Optional[str]:
  """A one-line usage message when `error` is gin reporting an unset required value."""
  text = str(error)
  macro = _UNSET_MACRO.search(text) if isinstance(error, ValueError) else None
  if macro:
    return f"{macro.group(1)} is required: pass --gin.{macro.group(1)}=..."
  argument = _UNSET_ARGUMENT.search(text) if isinstance(error, RuntimeError) else None
  if argument:
    names = [n.strip().strip("'\"") for n in argument.group(2).split(",") if n.strip()]
    flags = ", ".join(f"--gin.{argument.group(1)}.{n}=..." for n in names)
    return f"{argument.group(1)} needs {names} bound: pass {flags} or a gin file that binds them"
  return None


def run(main: Callable[[], object], argv: Optional[Sequence[str]] = None,
        devices: bool = False) -> None:
  """Parses gin flags and calls `main`. Data errors and required gin values left unset
  become one line on stderr and exit code 2, not a traceback.

  `devices`: the entry point computes on accelerators, so this process joins the
  distributed runtime (gensar_jax/distributed.py) between parsing gin and `main`, before
  anything else can touch JAX. On a pod worker the launcher's environment turns it on;
  elsewhere it only logs the topology line.
  """
  from gensar_jax import distributed  # registers initialize_distributed with gin
  argv = sys.argv[1:] if argv is None else argv
  if any(a in ("-h", "--help") for a in argv):
    print(_help_text(main))
    raise SystemExit(0)
  targets = {}
  try:
    parse_gin(argv)
    targets = binding_targets(parse_gin_flags(argv)[1])
    if devices:
      distributed.initialize_distributed()
    main()
  except GensarError as e:
    print(f"error: {user_message(e)}", file=sys.stderr)
    raise SystemExit(2) from None
  except (ValueError, RuntimeError) as e:
    message = missing_binding_message(e)
    if message is None:
      flag = flag_of_failure(e, targets)
      if flag is None:
        raise
      message = f"{flag}: {user_message(e)}"
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2) from None


def _help_text(main: Callable[[], object]) -> str:
  module = sys.modules.get(getattr(main, "__module__", ""), None)
  doc = getattr(module, "__doc__", None)
  for name, stage in stages.STAGES.items():
    if stage.module == getattr(module, "__name__", None):
      return stages.stage_help(name, doc, REPO_ROOT)
  return (doc or "").strip() or "flags: --gin_file=FILE --gin.NAME=VALUE --gin_bindings=B"


def run_module(name: str) -> None:
  """`python -m <name>`, run as the importable module `name` rather than as `__main__`.

  A gin configurable is registered under its module's name. Run as a script, an entry
  point's configurables would register as `__main__.x` and again as `<name>.x` once a gin
  file imports the module (directly or through the pipeline), and gin then rejects `x` as
  ambiguous. Each entry point therefore starts with a guard that hands over to this
  function before defining anything, so only the importable copy exists; the installed
  `gensar <stage>` command (gensar_jax/commands.py) comes here too. Whether the stage joins
  the distributed runtime, and whether it takes gin flags at all, is read from the stage
  table (gensar_jax/stages.py).
  """
  stage = stages.stage_of_module(name)
  devices = bool(stage and stage.devices)
  module = _import_quietly(name)
  try:
    if stage is not None and not stage.gin_flags:
      module.main()
    elif hasattr(module, "cli"):
      module.cli()
    else:
      run(module.main, devices=devices)
  except SystemExit:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    _exit_now_with_traceback(130 if isinstance(e, KeyboardInterrupt) else 1)
  raise SystemExit(0)


def _import_quietly(name: str):
  """Imports an entry point's module with TensorFlow's start-up noise silenced and
  TensorFlow kept off the accelerators.

  SeqIO and TFDS bring TensorFlow, which logs from C++ before its logging is set up (so
  TF_CPP_MIN_LOG_LEVEL does not reach it): oneDNN notices, "Could not find cuda drivers",
  "failed call to cuInit". Those lines go to file descriptor 2 while the module is
  imported and TensorFlow's devices are configured, and are dropped; Python exceptions
  still propagate and are printed after stderr is back. TensorFlow is only the input
  pipeline here, so it is given no GPU or TPU: JAX must own them (TF would otherwise
  reserve GPU memory).
  """
  import importlib
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    module = importlib.import_module(name)
    tf = sys.modules.get("tensorflow")
    if tf is not None:
      for kind in ("GPU", "TPU"):
        try:
          tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError):  # no such devices, or TF already initialised
          pass
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return module


def _exit_now_with_traceback(code: int) -> None:
  """Ends a failed entry-point process at once. After a failed asynchronous checkpoint
  save, orbax's signalling threads (not daemons) wait forever for the save's other steps,
  and a normal interpreter exit joins them and hangs (seen with a checkpoint directory that
  vanished mid-run). Only processes started through `run_module` do this; a `cli()` called
  in-process (tests) raises as usual."""
  traceback.print_exc()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
