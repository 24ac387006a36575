"""What the command-line entry points share: config overrides of sequences, and checks of everything a
user typed, run before any model is built, each failing with one line that names the problem.

* ``--config.key=value`` overrides work for tuple and list keys as a Python literal
  (``--config.data.paths="('/a', '/b')"``) or comma-separated (``--config.data.paths=/a,/b``;
  ``--config.data.resize_to_crop=false,true``); an element that is not a Python literal is a string.
* :func:`preflight_config` checks the config file, its variant and every override key before absl
  parses them (absl would report a wrong key as a long chained traceback).
* :func:`check_train_inputs` / :func:`check_eval_inputs` check the method, data sources, folders and
  checkpoint; :func:`exit_with_error` prints ``error: ...`` and exits.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from typing import Any, Sequence

from ml_collections import config_flags
from ml_collections.config_flags import tuple_parser

USAGE_ERROR = 2   # a problem with what was typed
RUN_ERROR = 1     # a problem found while running (NaN, unreadable data)


class InputError(ValueError):
  """Something the user gave (a path, a key, a value) cannot work; the message says what would."""


def exit_with_error(message: str, status: int = USAGE_ERROR) -> None:
  """Prints ``error: <message>`` on stderr and exits with ``status``."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


# ------------------------------------------------------------------------- sequence overrides


def _element(text: str) -> Any:
  text = text.strip()
  if text in ('true', 'false'):
    return text == 'true'
  try:
    return ast.literal_eval(text)
  except (SyntaxError, ValueError):
    return text


def parse_sequence(argument: Any, kind: type = tuple) -> tuple | list:
  """A Python literal (tuple or list), comma-separated elements, or one element -> ``kind``."""
  if isinstance(argument, (tuple, list)):
    return kind(argument)
  if argument is None:
    return kind()
  if not isinstance(argument, str):
    return kind((argument,))
  text = argument.strip()
  try:
    value = ast.literal_eval(text)
  except (SyntaxError, ValueError):
    value = None
  else:
    if isinstance(value, (tuple, list)):
      return kind(value)
  if text in ('', '()', '[]'):
    return kind()
  return kind(_element(part) for part in text.split(','))


class _SequenceParser(tuple_parser.TupleParser):
  """ml_collections' tuple parser that also reads ``a,b,c`` (and lists, for list fields)."""

  def __init__(self, kind: type):
    super().__init__()
    self.kind = kind

  def parse(self, argument):
    return parse_sequence(argument, self.kind)


def register_sequence_parsers() -> None:
  """Makes every tuple and list config key overridable from the command line (see module doc)."""
  config_flags.register_flag_parser_for_type(tuple, _SequenceParser(tuple))
  config_flags.register_flag_parser_for_type(list, _SequenceParser(list))


# ---------------------------------------------------------------------------- config checks


def _config_file_and_overrides(argv: Sequence[str], flag: str) -> tuple[str | None, list[str]]:
  path, keys = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if not arg.startswith('-'):
      continue
    name, has_value, value = arg.lstrip('-').partition('=')
    if name == flag:
      path = value if has_value else (args[i + 1] if i + 1 < len(args) else None)
    elif name.startswith(flag + '.'):
      keys.append(name[len(flag) + 1:])
  return path, keys


def load_config_file(spec: str) -> Any:
  """``path[:variant]`` -> ``get_config(variant)``; :class:`InputError` naming what is wrong."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or '.'
    found = sorted(f for f in os.listdir(folder) if f.endswith('.py') and 'def get_config' in
                   open(os.path.join(folder, f), encoding='utf-8').read()) \
        if os.path.isdir(folder) else []
    hint = f'; {folder}/ has {", ".join(found)}' if found else ''
    raise InputError(f'--config={spec}: no such config file {path}{hint}')
  module_spec = importlib.util.spec_from_file_location('sr_jax_preflight_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise InputError(f'--config={spec}: {path} has no get_config()')
  try:
    return module.get_config(*([variant] if variant else []))
  except ValueError as e:
    raise InputError(f'--config={spec}: {e}') from None


def check_override_key(config: Any, key: str, flag: str = 'config') -> None:
  """Raises :class:`InputError` when ``--config.<key>`` names no key of ``config``."""
  node, walked = config, flag
  for name in key.split('.'):
    keys = list(node.keys()) if hasattr(node, 'keys') else []
    if name not in keys:
      close = difflib.get_close_matches(name, keys, n=3)
      hint = f'; did you mean {", ".join(walked + "." + c for c in close)}?' if close else ''
      raise InputError(f'--{flag}.{key}: {walked} has no key {name!r}{hint} (its keys: '
                       f'{", ".join(sorted(map(str, keys)))})')
    node, walked = node[name], f'{walked}.{name}'


def preflight_config(argv: Sequence[str], flag: str = 'config') -> None:
  """Checks ``--config`` and every ``--config.key`` in ``argv``; exits with one line on a problem."""
  spec, keys = _config_file_and_overrides(argv, flag)
  if spec is None:
    return  # absl reports the missing required flag
  try:
    config = load_config_file(spec)
    for key in keys:
      check_override_key(config, key, flag)
  except InputError as e:
    exit_with_error(str(e))


# --------------------------------------------------------------------------- input checks


def check_method(config: Any) -> None:
  from sr_jax import methods  # pylint: disable=g-import-not-at-top
  try:
    methods.get(config.method)
  except methods.UnknownMethodError as e:
    raise InputError(f'--config.method: {e}') from None


def check_data_sources(config: Any) -> None:
  """Every ``config.data`` source lists images and has a readable one (as the trainer will)."""
  from sr_jax.data import sources  # pylint: disable=g-import-not-at-top
  data = config.data
  try:
    listed = sources.list_sources(list(data.paths))
    sources.check_sources(listed, data.min_image_side)
  except ValueError as e:
    raise InputError(f'--config.data.paths: {e} (set it to folders, .txt lists or "skimage:", e.g. '
                     "--config.data.paths=/data/LSDIR,/data/ffhq.txt)") from None


def _check_not_a_file(path: str, flag: str) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f'--{flag}={path} is a file; give a folder (it is created if missing)')


def check_train_inputs(config: Any, workdir: str) -> None:
  """Method, workdir and data sources of a training run (before any model is built)."""
  check_method(config)
  _check_not_a_file(workdir, 'workdir')
  if 'data' in config:
    check_data_sources(config)


def check_eval_inputs(config: Any, checkpoint: str, input_dir: str, output_dir: str,
                      gt_dir: str | None, perceptual_weights: str | None = None) -> None:
  """Method, checkpoint, input (with images), output, ground-truth and perceptual-weights folders
  of an evaluation."""
  from sr_jax.data.sources import IMAGE_EXTENSIONS  # pylint: disable=g-import-not-at-top
  from sr_jax.methods import common  # pylint: disable=g-import-not-at-top
  check_method(config)
  try:
    common.checkpoint_kind(checkpoint)
  except FileNotFoundError as e:
    raise InputError(str(e)) from None
  if not os.path.isdir(input_dir):
    raise InputError(f'--input={input_dir}: no such folder')
  if not any(n.lower().endswith(IMAGE_EXTENSIONS) for n in os.listdir(input_dir)):
    raise InputError(f'--input={input_dir} has no images ({"/".join(IMAGE_EXTENSIONS)})')
  _check_not_a_file(output_dir, 'output')
  if gt_dir is not None and not os.path.isdir(gt_dir):
    raise InputError(f'--gt={gt_dir}: no such folder')
  if perceptual_weights and not os.path.isdir(perceptual_weights):
    raise InputError(f'--perceptual_weights={perceptual_weights}: no such folder (make it with '
                     '`python -m convert_weights perceptual --out DIR`)')


# -------------------------------------------------------------------------------- log noise

# Libraries whose INFO lines would bury the progress lines (orbax logs ~100 per run); their
# warnings and errors still show.
QUIET_LIBRARIES = ('/orbax/', '/etils/', '/grain/', '/jax/_src/')


class _QuietLibraries:
  def filter(self, record) -> bool:
    import logging  # pylint: disable=g-import-not-at-top
    path = record.pathname.replace(os.sep, '/')
    return record.levelno >= logging.WARNING or not any(lib in path for lib in QUIET_LIBRARIES)


def quiet_library_logs() -> None:
  """Drops INFO lines of :data:`QUIET_LIBRARIES` from absl's log handler (sr_jax's own stay)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
