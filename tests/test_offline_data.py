"""Offline, a dataset that is not prepared fails within seconds (not TFDS's minutes of
retries) with an actionable error, and the data directory is left as it was.

"Offline" is made the same on every machine: the download goes through an HTTP proxy on
localhost that refuses connections, or accepts them and never answers. Each run is a
subprocess with a timeout, so a regression fails the test instead of hanging it.
"""
import http.server
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

from mmjax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
CHILD = """
import sys, time, types
from mmjax.data import sources
sources.PROBE_TIMEOUT_S = float(sys.argv[2])
config = types.SimpleNamespace(name="kmnist", data_dir=sys.argv[1], download=True,
                               cache_decoded=True)
start = time.monotonic()
try:
  sources.load_source(config, "test")
  print("LOADED")
except sources.DatasetNotFoundError as e:
  print("ERROR", e)
print("SECONDS", time.monotonic() - start)
"""


def _listing(directory: pathlib.Path):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")) \
      if directory.exists() else None


def _load_offline(data_dir: pathlib.Path, proxy_port: int,
                  probe_timeout: float = sources.PROBE_TIMEOUT_S) -> tuple[str, float]:
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  env.update({name: f"http://127.0.0.1:{proxy_port}" for name in PROXY_VARS})
  env.pop("NO_PROXY", None)
  env.pop("no_proxy", None)
  run = subprocess.run([sys.executable, "-c", CHILD, str(data_dir), str(probe_timeout)],
                       env=env, text=True,
                       capture_output=True, timeout=90)
  lines = run.stdout.splitlines()
  error = next((line for line in lines if line.startswith(("ERROR", "LOADED"))), None)
  seconds = [float(line.split()[1]) for line in lines if line.startswith("SECONDS")]
  assert error and seconds, run.stdout + run.stderr[-3000:]
  return error, seconds[0]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _assert_fast_and_actionable(error: str, seconds: float, data_dir: pathlib.Path):
  assert error.startswith("ERROR Dataset 'kmnist' is not prepared in"), error
  assert str(data_dir) in error and "cannot be downloaded" in error
  assert "TFDS_DATA_DIR" in error and "--config.dataset.data_dir" in error
  assert seconds < 30, (seconds, error)


def test_refused_connection_fails_fast_and_creates_no_data_dir(tmp_path):
  data_dir = tmp_path / "tfds"
  error, seconds = _load_offline(data_dir, _free_port())
  _assert_fast_and_actionable(error, seconds, data_dir)
  assert not data_dir.exists(), _listing(data_dir)


def test_silent_network_fails_fast_and_leaves_the_data_dir_as_it_was(tmp_path):
  """A proxy that accepts connections and never answers: the probe's timeout ends it."""
  data_dir = tmp_path / "tfds"
  (data_dir / "downloads").mkdir(parents=True)
  (data_dir / "notes.txt").write_text("kept")
  (data_dir / "downloads" / "other.zip").write_bytes(b"kept")
  before = _listing(data_dir)
  with socket.socket() as silent:
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # Connections complete in the kernel's backlog; nothing answers.
    # A one-second probe: the same path as the default's, sooner.
    error, seconds = _load_offline(data_dir, silent.getsockname()[1], probe_timeout=1.0)
  _assert_fast_and_actionable(error, seconds, data_dir)
  assert "Timeout" in error, error
  assert _listing(data_dir) == before


@pytest.mark.parametrize("failure", [ConnectionError("network gone"), KeyboardInterrupt()])
def test_a_failed_download_removes_what_it_wrote(tmp_path, monkeypatch, failure):
  """Past the probe (a host that answers), a download that fails midway or is
  interrupted: its partial and .tmp files go, everything that was there stays."""
  import tensorflow_datasets as tfds

  data_dir = tmp_path / "tfds"
  for kept in ("notes.txt", "downloads/other.zip", "downloads/extracted/other/file",
               "downloads/kmnist/earlier.gz", "mnist/3.0.1/dataset_info.json"):
    (data_dir / kept).parent.mkdir(parents=True, exist_ok=True)
    (data_dir / kept).write_text("kept")
  before = _listing(data_dir)

  def download_and_prepare(builder, *args, **kwargs):
    root = pathlib.Path(builder.data_dir_root)
    for partial in ("downloads/kmnist/train-images.gz.tmp.1a2b", "downloads/extracted/ZIP.x",
                    "kmnist/3.0.1.incomplete.X/kmnist-train.array_record-00000",
                    "downloads/kmnist.tmp/x"):
      (root / partial).parent.mkdir(parents=True, exist_ok=True)
      (root / partial).write_text("partial")
    raise failure

  monkeypatch.setattr(sources, "unreachable_hosts", lambda urls: {})
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  expected = sources.DatasetNotFoundError if isinstance(failure, Exception) else KeyboardInterrupt
  with pytest.raises(expected) as e:
    sources.tfds_source("kmnist", "test", data_dir=str(data_dir))
  if expected is sources.DatasetNotFoundError:
    assert "downloading it failed (ConnectionError: network gone)" in str(e.value)
    assert str(data_dir) in str(e.value)
  assert _listing(data_dir) == before


def test_a_failed_download_into_a_new_data_dir_removes_it(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def download_and_prepare(builder, *args, **kwargs):
    partial = pathlib.Path(builder.data_dir_root) / "downloads" / "kmnist" / "x.tmp.1"
    partial.parent.mkdir(parents=True)
    partial.write_text("partial")
    raise OSError("disk full")

  monkeypatch.setattr(sources, "unreachable_hosts", lambda urls: {})
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
  with pytest.raises(sources.DatasetNotFoundError, match="OSError: disk full"):
    sources.tfds_source("kmnist", "test", data_dir=str(tmp_path / "new"))
  assert not (tmp_path / "new").exists()


class _StatusHandler(http.server.BaseHTTPRequestHandler):
  def do_GET(self):  # /503 answers 503, and so on.
    self.send_response(int(self.path.strip("/")))
    self.send_header("Content-Length", "0")
    self.end_headers()

  def log_message(self, *args):
    pass


def test_unreachable_hosts(monkeypatch):
  """Any HTTP answer counts as reachable except those TFDS retries for minutes."""
  for name in PROXY_VARS:
    monkeypatch.delenv(name, raising=False)
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    host = f"127.0.0.1:{server.server_address[1]}"
    # One probe per host: the first of its URLs.
    assert sources.unreachable_hosts([f"http://{host}/200", f"http://{host}/503"]) == {}
    assert sources.unreachable_hosts([f"http://{host}/404", "ftp://example.invalid/x"]) == {}
    assert sources.unreachable_hosts([f"http://{host}/503"]) == {host: "HTTP 503"}
  finally:
    server.shutdown()
    server.server_close()
  refused = f"127.0.0.1:{_free_port()}"
  start = time.monotonic()
  why = sources.unreachable_hosts([f"http://{refused}/a", f"http://{refused}/b"], timeout=2)
  assert list(why) == [refused] and "ConnectionError" in why[refused]
  assert time.monotonic() - start < 10
