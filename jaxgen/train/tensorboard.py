"""TensorBoard scalar event files written without importing TensorFlow.

clu's SummaryWriter imports TensorFlow (and Keras), ~10 s at every start of `jaxgen.main`;
the event-file format is just TFRecord framing around `Event` protos, which the `tensorboard`
package provides without TensorFlow.
"""

import os
import socket
import struct
import time

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c


class ScalarWriter:
  """Appends scalar summaries to a new `events.out.tfevents.*` file under `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    path = os.path.join(logdir, name)
    n = 0
    while os.path.exists(path + (f".{n}" if n else "")):
      n += 1
    self.path = path + (f".{n}" if n else "")
    self._file = open(self.path, "wb")
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def _write(self, event: event_pb2.Event) -> None:
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    self._file.write(header + struct.pack("<I", masked_crc32c(header)) + data +
                     struct.pack("<I", masked_crc32c(data)))

  def write_scalars(self, step: int, scalars: dict) -> None:
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()]
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
