"""A small OpenAI-compatible server for the openai backend's test: tiny-random behind
/v1/completions (token-id prompts, logprobs, token_id:N tokens, seed) and /v1/load_weights.

Run: python tests/distributed/openai_stub.py PORTFILE; it writes its port there."""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from transformers import AutoModelForCausalLM

from thinkrl.distributed.ray_engine import SeededEngine, Seq
from thinkrl.models import load_model
from thinkrl.rollout import SamplingParams

model, tok = load_model("tiny-random")
engine = SeededEngine(model, tok)
state = {"version": 0, "requests": []}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._reply(200, {"version": state["version"], "requests": state["requests"]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/load_weights":
            engine.load_state_dict(AutoModelForCausalLM.from_pretrained(body["path"]).state_dict())
            state["version"] = body["version"]
            return self._reply(200, {"version": body["version"]})
        if self.path != "/v1/completions":
            return self._reply(404, {"error": "not found"})
        state["requests"].append({k: v for k, v in body.items() if k != "prompt"})
        s = Seq(uid=body["seed"], prompt_ids=body["prompt"])
        engine.continue_(
            [s],
            body["max_tokens"],
            SamplingParams(
                max_new_tokens=body["max_tokens"], temperature=body["temperature"], top_p=body["top_p"]
            ),
            0,
            0,
        )
        self._reply(
            200,
            {
                "choices": [
                    {
                        "text": tok.decode(s.tokens),
                        "finish_reason": "length" if s.truncated or not s.done else "stop",
                        "logprobs": {
                            "tokens": [f"token_id:{t}" for t in s.tokens],
                            "token_logprobs": s.logps,
                        },
                    }
                ]
            },
        )


if __name__ == "__main__":
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    with open(sys.argv[1], "w") as f:
        f.write(str(srv.server_address[1]))
    srv.serve_forever()
