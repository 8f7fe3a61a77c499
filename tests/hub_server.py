"""A minimal Hub-compatible HTTP endpoint on 127.0.0.1 for upload tests (what huggingface_hub calls to create a
repo and commit files): POST /api/repos/create, POST /api/models/{repo}/preupload/{revision} (every file
answered as a regular, in-payload upload) and POST /api/models/{repo}/commit/{revision} (NDJSON, base64 files).
"""

import base64
import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id → {"private": bool}
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "create_pr", "files": {path: bytes}}
        self.requests: list[str] = []


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _body(self) -> bytes:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            return gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            state.requests.append(f"GET {self.path}")
            self._reply(404, {"error": "not implemented in the test hub"})

        def do_POST(self):
            url = urlparse(self.path)
            path = unquote(url.path)
            state.requests.append(f"POST {path}")
            body = self._body()
            if path == "/api/repos/create":
                request = json.loads(body)
                repo = (
                    f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                )
                private = request.get("visibility") == "private" or bool(request.get("private"))
                state.repos[repo] = {"private": private}
                return self._reply(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            if path == "/api/validate-yaml":  # the card's metadata block must be valid YAML
                content = json.loads(body)["content"]
                try:
                    yaml.safe_load(content.split("---")[1])
                except (yaml.YAMLError, IndexError) as error:
                    return self._reply(400, {"error": f"invalid card metadata: {error}"})
                return self._reply(200, {"errors": [], "warnings": []})
            if path.startswith("/api/models/") and "/preupload/" in path:
                files = json.loads(body)["files"]
                return self._reply(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            if path.startswith("/api/models/") and "/commit/" in path:
                repo, _, revision = path[len("/api/models/") :].partition("/commit/")
                commit = {
                    "repo": repo,
                    "revision": revision,
                    "files": {},
                    "create_pr": parse_qs(url.query).get("create_pr") == ["1"],
                }
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "header":
                        commit["summary"] = item["value"]["summary"]
                    elif item["key"] == "file":
                        commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                state.commits.append(commit)
                reply = {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40}
                if commit["create_pr"]:
                    reply["pullRequestUrl"] = f"http://{self.headers['Host']}/{repo}/discussions/1"
                return self._reply(200, reply)
            return self._reply(404, {"error": f"unexpected call {path}"})

    return Handler


class LocalHub:
    """Context manager: a running test hub; ``endpoint`` is its base URL."""

    def __enter__(self):
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
