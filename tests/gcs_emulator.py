"""A GCS emulator for the tests: gcp-storage-emulator, plus the headers tensorstore reads.

Run as `python tests/gcs_emulator.py PORT BUCKET`. The emulator speaks the GCS JSON API
but sends no `x-goog-generation` with an object's bytes; real GCS does, and tensorstore
(orbax's array writer) refuses a download without it ("Malformed StorageGeneration").
The wrapper adds the object's generation and metageneration to each download response;
nothing else about the emulator is changed.
"""
from __future__ import annotations

import sys

from gcp_storage_emulator.handlers import objects


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # pylint: disable=broad-except  # the wrapped handler answers 404
    obj = None
  if obj:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  return _original_download(request, response, storage, *args, **kwargs)


_original_download = objects.download
objects.download = _download_with_generation

from gcp_storage_emulator import server  # noqa: E402  # pylint: disable=g-import-not-at-top


def main() -> None:
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  main()
