"""What a user types: sequence overrides of every config, and one-line errors before any model is built.

The subprocess tests run the real `train.py` / `eval.py` as a user does; each problem must end the
command with exit status 2 (1 for a NaN stop), one `error:` line on stderr, no traceback, and, for
the input checks, before the trainer builds a model.
"""
import os
import subprocess
import sys
import time

import pytest
from absl import flags
from ml_collections import config_flags

import tiny_runs
from sr_jax import cli

cli.register_sequence_parsers()
CONFIGS = ('configs/omgsr.py:512', 'configs/omgsr.py:tiny', 'tests/toy_method_config.py')


def _sequence_keys(node, prefix=''):
  """Dotted keys of every tuple/list value of a config (nested ConfigDicts included)."""
  for key in node.keys():
    value = node[key]
    if hasattr(value, 'keys'):
      yield from _sequence_keys(value, f'{prefix}{key}.')
    elif isinstance(value, (tuple, list)) and value and all(
        isinstance(v, (str, int, float, bool)) for v in value):
      yield f'{prefix}{key}'


def _parse(spec, *overrides):
  """Parses like `train.py`: config_flags finds the override flags in the argv it is given."""
  argv = ['prog', f'--config={spec}', *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, 'test', flag_values=values,
                                           sys_argv=argv)
  values(argv)
  return holder.value


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('spec', CONFIGS)
def test_every_sequence_key_of_every_config_overrides_comma_separated_and_as_a_literal(spec):
  config = cli.load_config_file(spec)
  keys = list(_sequence_keys(config))
  assert keys, spec
  for key in keys:
    value = _get(config, key)
    reversed_value = type(value)(reversed(value)) if len(value) > 1 else value
    text = ','.join(str(v).lower() if isinstance(v, bool) else str(v) for v in reversed_value)
    got = _get(_parse(spec, f'--config.{key}={text}'), key)
    assert got == reversed_value and type(got) is type(value), (key, text, got)
    got = _get(_parse(spec, f'--config.{key}={tuple(reversed_value)!r}'), key)
    assert got == reversed_value, (key, got)


def test_readme_data_override_gives_the_two_sources():
  for override in ("--config.data.paths=('/data/LSDIR', '/data/ffhq_first10k.txt')",
                   '--config.data.paths=/data/LSDIR,/data/ffhq_first10k.txt'):
    config = _parse('configs/omgsr.py', override, '--config.data.resize_to_crop=false,true')
    assert tuple(config.data.paths) == ('/data/LSDIR', '/data/ffhq_first10k.txt')
    assert list(config.data.resize_to_crop) == [False, True]


def _run(script, *args, env=None):
  start = time.time()
  result = subprocess.run([sys.executable, os.path.join(tiny_runs.REPO, script), *args],
                          cwd=tiny_runs.REPO, env=env or tiny_runs.subprocess_env(1),
                          capture_output=True, text=True, timeout=300)
  return result, time.time() - start


def _assert_one_line_error(result, status, *fragments):
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == status, result.stderr[-3000:]
  assert len(errors) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  assert 'building the' not in result.stderr  # no model was built


@pytest.mark.parametrize('args,fragments', [
    (['--config.nope=1'], ["config has no key 'nope'"]),
    (['--config.model.t_str=3'], ["did you mean config.model.t_star"]),
    (['--config.data.paths=/no/such/folder'], ["'/no/such/folder' is neither a folder"]),
    (['--config.method=nope'], ["unknown method 'nope'; known methods: omgsr"]),
], ids=['unknown key', 'misspelt key', 'data path', 'method'])
def test_train_py_names_a_wrong_key_or_path_in_one_line(tmp_path, args, fragments):
  result, seconds = _run('train.py', '--config=configs/omgsr.py:tiny',
                         f'--workdir={tmp_path / "w"}', *args)
  _assert_one_line_error(result, 2, *fragments)
  assert seconds < 60, seconds  # checked before any model is built (imports only)


def test_train_py_names_a_missing_config_file_and_variant(tmp_path):
  result, _ = _run('train.py', '--config=configs/doesnotexist.py', f'--workdir={tmp_path}')
  _assert_one_line_error(result, 2, 'no such config file', 'omgsr.py')
  result, _ = _run('train.py', '--config=configs/omgsr.py:big', f'--workdir={tmp_path}')
  _assert_one_line_error(result, 2, "unknown OMGSR config variant 'big'")


def test_eval_py_checks_its_folders_first(tmp_path):
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  empty = tmp_path / 'empty'
  empty.mkdir()
  base = ['--config=tests/toy_method_config.py']
  result, _ = _run('eval.py', *base, f'--checkpoint={tmp_path / "none"}', f'--input={empty}',
                   f'--output={tmp_path / "o"}')
  _assert_one_line_error(result, 2, 'no such folder')
  workdir = tmp_path / 'w'
  (workdir / 'checkpoints').mkdir(parents=True)
  result, _ = _run('eval.py', *base, f'--checkpoint={workdir}', f'--input={empty}',
                   f'--output={tmp_path / "o"}')
  _assert_one_line_error(result, 2, 'has no images')
  (empty / 'x.png').write_bytes(b'')
  result, _ = _run('eval.py', *base, f'--checkpoint={workdir}', f'--input={empty}',
                   f'--output={a_file}')
  _assert_one_line_error(result, 2, 'is a file')


def test_nan_stop_is_one_line_naming_the_step(tmp_path):
  # A learning rate of 1e38 sends the toy step's params to infinity at once: NaN at step 2.
  result, _ = _run('train.py', '--config=tests/toy_method_config.py', f'--workdir={tmp_path}',
                   '--config.optim.learning_rate=1e38', '--config.optim.clip_norm=1e38')
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert len(errors) == 1 and 'non-finite metrics' in errors[0] and 'at step' in errors[0], errors
