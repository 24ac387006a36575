"""Training summaries: TensorBoard event files, LQ | SR | HQ image grids, the progress line.

TensorBoard files are written by a small self-contained writer (TFRecord framing + hand-encoded
``tensorflow.Event`` protos): ``clu.metric_writers`` imports tensorflow (1.45 GB) and tensorboardX
would add protobuf-generated code for the two messages we need. Only scalars and PNG images are
supported; TensorBoard reads the files as usual (``tensorboard --logdir <workdir>/tensorboard``).

Everything here writes only on process 0 (``enabled=jax.process_index() == 0`` in the trainer).
"""
from __future__ import annotations

import datetime
import io
import json
import os
import socket
import struct
import time
from typing import Mapping

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Minimal TensorBoard event writer
# ----------------------------------------------------------------------------------------------


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord framing requires (zlib only has CRC-32/IEEE)."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
  header = struct.pack('<Q', len(data))
  return (header + struct.pack('<I', _masked_crc(header)) + data
          + struct.pack('<I', _masked_crc(data)))


def _varint(value: int) -> bytes:
  out = bytearray()
  value &= (1 << 64) - 1
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
  return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, payload: bytes) -> bytes:
  return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _field_double(number: int, value: float) -> bytes:
  return _varint((number << 3) | 1) + struct.pack('<d', value)


def _field_float(number: int, value: float) -> bytes:
  return _varint((number << 3) | 5) + struct.pack('<f', value)


def event_proto(step: int, wall_time: float, *, file_version: str | None = None,
                summary_values: list[bytes] | None = None) -> bytes:
  """``tensorflow.Event``: wall_time=1 (double), step=2 (int64), file_version=3, summary=5."""
  out = _field_double(1, wall_time) + _field_varint(2, step)
  if file_version is not None:
    out += _field_bytes(3, file_version.encode())
  if summary_values is not None:
    out += _field_bytes(5, b''.join(_field_bytes(1, v) for v in summary_values))
  return out


def scalar_value(tag: str, value: float) -> bytes:
  """``Summary.Value``: tag=1, simple_value=2 (float)."""
  return _field_bytes(1, tag.encode()) + _field_float(2, float(value))


def image_value(tag: str, png: bytes, height: int, width: int, channels: int) -> bytes:
  """``Summary.Value`` with image=4: ``Summary.Image`` height=1, width=2, colorspace=3, png=4."""
  image = (_field_varint(1, height) + _field_varint(2, width) + _field_varint(3, channels)
           + _field_bytes(4, png))
  return _field_bytes(1, tag.encode()) + _field_bytes(4, image)


class SummaryWriter:
  """Appends scalar and image events to ``<logdir>/events.out.tfevents.<time>.<host>``.

  A disabled writer (processes other than 0) accepts every call and writes nothing.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}'
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, 'ab')
    self._write(event_proto(0, time.time(), file_version='brain.Event:2'))

  def _write(self, event: bytes) -> None:
    self._file.write(tfrecord(event))

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self.enabled:
      self._write(event_proto(step, time.time(),
                              summary_values=[scalar_value(k, v) for k, v in values.items()]))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """``image``: uint8 HWC (C = 1, 3 or 4), stored as PNG."""
    if self.enabled:
      height, width, channels = image.shape
      value = image_value(tag, encode_png(image), height, width, channels)
      self._write(event_proto(step, time.time(), summary_values=[value]))

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def read_events(path: str) -> list[dict]:
  """Decodes our own event files (CRC-checked): ``[{'step', 'scalars': {tag: value}, 'images':
  {tag: png_bytes}}]``. For tests and quick inspection without TensorBoard."""
  with open(path, 'rb') as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack_from('<Q', data, pos)
    (len_crc,) = struct.unpack_from('<I', data, pos + 8)
    payload = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack_from('<I', data, pos + 12 + length)
    if len_crc != _masked_crc(data[pos:pos + 8]) or data_crc != _masked_crc(payload):
      raise ValueError(f'CRC mismatch in record at byte {pos} of {path}')
    events.append(_decode_event(payload))
    pos += 16 + length
  return events


def _decode_fields(buf: bytes):
  """Yields (field number, value) of a protobuf message: ints, bytes, or floats."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      (value,), pos = struct.unpack_from('<d', buf, pos), pos + 8
    elif wire == 5:
      (value,), pos = struct.unpack_from('<f', buf, pos), pos + 4
    else:
      length, pos = _read_varint(buf, pos)
      value, pos = buf[pos:pos + length], pos + length
    yield number, value


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = shift = 0
  while True:
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return result, pos


def _decode_event(payload: bytes) -> dict:
  event = {'step': 0, 'scalars': {}, 'images': {}}
  for number, value in _decode_fields(payload):
    if number == 2:
      event['step'] = value
    elif number == 5:
      for _, raw_value in _decode_fields(value):
        fields = dict(_decode_fields(raw_value))
        tag = fields[1].decode()
        if 2 in fields:
          event['scalars'][tag] = fields[2]
        if 4 in fields:
          event['images'][tag] = dict(_decode_fields(fields[4]))[4]
  return event


# ----------------------------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------------------------

def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] float images -> uint8 (clipped)."""
  images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0.0, 255.0)
  return np.round(images).astype(np.uint8)


def _resize_to(images: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize (LQ may be smaller than HQ): shows the LQ pixels as they are."""
  if images.shape[1:3] == (height, width):
    return images
  return np.stack([np.asarray(Image.fromarray(im.squeeze()).resize((width, height),
                                                                   Image.NEAREST))
                   .reshape(height, width, -1) for im in images])


LABEL_HEIGHT = 14  # px of the header row that names the columns


def image_grid(columns: list[np.ndarray], pad: int = 2, labels: list[str] | None = None
               ) -> np.ndarray:
  """One row per example, one column per image set (e.g. LQ | SR | HQ), uint8 HWC.

  Each column is an NHWC batch in [-1, 1]; all are resized to the size of the last column.
  ``labels`` name the columns in a header row.
  """
  columns = [to_uint8(c) for c in columns]
  n, height, width, channels = columns[-1].shape
  columns = [_resize_to(c[:n], height, width) for c in columns]
  top = LABEL_HEIGHT if labels else 0
  grid = np.full((top + n * (height + pad) + pad, len(columns) * (width + pad) + pad, channels),
                 255, np.uint8)
  for i in range(n):
    for j, column in enumerate(columns):
      y, x = top + pad + i * (height + pad), pad + j * (width + pad)
      grid[y:y + height, x:x + width] = column[i]
  if labels:
    image = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(labels):
      draw.text((pad + j * (width + pad) + 2, 1), label, fill=0 if channels == 1 else (0, 0, 0))
    grid = np.asarray(image).reshape(grid.shape)
  return grid


def encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format='PNG')
  return buffer.getvalue()


def save_png(path: str, image: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(encode_png(image))


# ----------------------------------------------------------------------------------------------
# Progress line and metrics file
# ----------------------------------------------------------------------------------------------

def progress_line(step: int, max_steps: int, metrics: Mapping[str, float], steps_per_sec: float,
                  tflops_per_device: float | None = None, mfu: float | None = None) -> str:
  """One log line, e.g.

  ``step 120/6000 (2.0%) | loss 0.1234 | 3.21 steps/s | 41.2 TFLOP/s/dev | MFU 4.2% | ETA 0:30:31``
  """
  parts = [f'step {step}/{max_steps} ({100.0 * step / max(max_steps, 1):.1f}%)']
  parts += [f'{k} {v:.4g}' for k, v in metrics.items()]
  parts.append(f'{steps_per_sec:.3g} steps/s')
  if tflops_per_device is not None:
    parts.append(f'{tflops_per_device:.3g} TFLOP/s/dev')
  if mfu is not None:
    parts.append(f'MFU {100.0 * mfu:.1f}%')
  eta = (max_steps - step) / steps_per_sec if steps_per_sec > 0 else float('inf')
  eta_text = str(datetime.timedelta(seconds=round(eta))) if np.isfinite(eta) else '?'
  parts.append(f'ETA {eta_text}')
  return ' | '.join(parts)


def drop_jsonl_rows_after(path: str, step: int) -> None:
  """Removes the rows of ``path`` with a step above ``step`` (a run resumed from that checkpoint
  logs those steps again)."""
  if not os.path.isfile(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = [line for line in lines if line.strip() and json.loads(line).get('step', 0) <= step]
  if len(kept) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(kept)
    os.replace(path + '.tmp', path)


def append_jsonl(path: str, record: Mapping[str, float]) -> None:
  """One JSON object per line: the logged metrics, readable without TensorBoard."""
  with open(path, 'a') as f:
    f.write(json.dumps(dict(record)) + '\n')
