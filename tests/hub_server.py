"""A local HTTP server answering the Hugging Face Hub routes ``huggingface_hub`` uses.

Serves repositories from folders: ``branches[(repo_id, branch)] = (commit_sha, folder)``.
Routes (what the client really calls, recorded in ``requests``):
``GET /api/models/{repo}/revision/{rev}`` (a revision's commit and files),
``GET /api/models/{repo}/tree/{rev}`` (the file listing), ``GET /api/models/{repo}/refs``
(branches and their commits) and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (a file,
with the commit and ETag headers). Pointing ``HF_ENDPOINT`` here exercises the real client.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote


class HubServer:
    def __init__(self) -> None:
        self.branches: dict[tuple[str, str], tuple[str, Path]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = unquote(self.path.split("?", 1)[0])
                server.requests.append(f"{self.command} {path}")
                if path.startswith("/api/models/") and path.endswith("/refs"):
                    return self._refs(path.removeprefix("/api/models/").removesuffix("/refs"), body)
                if path.startswith("/api/models/") and "/tree/" in path:
                    return self._tree(path.removeprefix("/api/models/"), body)
                if path.startswith("/api/models/"):
                    return self._info(path.removeprefix("/api/models/"), body)
                if "/resolve/" in path:
                    return self._file(path.lstrip("/"), body)
                self._send(404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"}, body)

            def _lookup(self, repo: str, rev: str):
                for (r, name), value in server.branches.items():
                    if r == repo and rev in (name, value[0]):
                        return value
                return None

            def _info(self, rest: str, body: bool):
                repo, _, rev = rest.partition("/revision/")
                found = self._lookup(repo, rev or "main")
                if found is None:
                    return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
                sha, folder = found
                files = sorted(
                    p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                )
                info = {
                    "id": repo,
                    "modelId": repo,
                    "sha": sha,
                    "private": False,
                    "siblings": [{"rfilename": f} for f in files],
                }
                self._send(
                    200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body
                )

            def _refs(self, repo: str, body: bool):
                heads = [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for (r, b), (sha, _) in sorted(server.branches.items())
                    if r == repo
                ]
                if not heads:
                    return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, body)
                refs = {"branches": heads, "tags": [], "converts": []}
                self._send(
                    200, json.dumps(refs).encode(), {"Content-Type": "application/json"}, body
                )

            def _tree(self, rest: str, body: bool):
                repo, _, rev = rest.partition("/tree/")
                found = self._lookup(repo, rev.split("/", 1)[0])
                if found is None:
                    return self._send(404, b"{}", {"X-Error-Code": "RevisionNotFound"}, body)
                _, folder = found
                entries = []
                for p in sorted(folder.rglob("*")):
                    rel = p.relative_to(folder).as_posix()
                    if p.is_dir():
                        entries.append({"type": "directory", "path": rel, "oid": "0" * 40})
                    else:
                        data = p.read_bytes()
                        entries.append(
                            {
                                "type": "file",
                                "path": rel,
                                "size": len(data),
                                "oid": hashlib.sha1(data).hexdigest(),
                            }
                        )
                self._send(
                    200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, body
                )

            def _file(self, rest: str, body: bool):
                head, _, filename = rest.partition("/resolve/")
                rev, _, filename = filename.partition("/")
                found = self._lookup(head, rev)
                if found is None or not (found[1] / filename).is_file():
                    return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, body)
                sha, folder = found
                data = (folder / filename).read_bytes()
                etag = hashlib.sha1(data).hexdigest()
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": f'"{etag}"',
                    "Content-Type": "application/octet-stream",
                }
                self._send(200, data, headers, body)

            def _send(self, code, data, headers, body):
                self.send_response(code)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
