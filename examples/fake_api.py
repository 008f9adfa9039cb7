"""A local stand-in for the Ideogram API, for trying ideogram-sync without a key or a network.

    python3 examples/fake_api.py [--port 8000] [--folder examples]

It serves, from the folder's files, read again on every request (edit them between runs):

    GET /datasets          datasets.json
    GET /models            models.json
    GET /datasets/{id}     details/datasets/{id}.json   (404 when there is no such file)
    GET /models/{id}       details/models/{id}.json     (404 when there is no such file)

each as application/json. It does not check the Api-Key header; the tool still needs one set.
Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# An item's id as a file name: no "/" or "..", so a request cannot leave the folder.
_ID = re.compile(r"[A-Za-z0-9_.-]{1,255}")


def file_for(folder: Path, path: str) -> Path | None:
    """The file that answers `path`, or None."""
    parts = [unquote(part) for part in urlsplit(path).path.strip("/").split("/")]
    if parts in (["datasets"], ["models"]):
        return folder / f"{parts[0]}.json"
    kind, item = [*parts, ""][:2]
    if (
        len(parts) == 2
        and kind in ("datasets", "models")
        and _ID.fullmatch(item)
        and ".." not in item
    ):
        return folder / "details" / kind / f"{item}.json"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--folder", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    folder: Path = args.folder

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            found = file_for(folder, self.path)
            if found is None or not found.is_file():
                self._send(404, b'{"detail": "Not Found"}')
            else:
                self._send(200, found.read_bytes())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"serving {folder} as the Ideogram API on http://127.0.0.1:{args.port} (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
