"""math-verify inside a sandboxed worker (see thinkrl.sandbox.worker). JSON lines in and out.

Request ``{"gold": str, "pred": str}`` -> ``{"ok": bool}`` or ``{"error": str}``. math-verify's
own signal.alarm timeouts are off: the parent kills this process when a request is late.
"""

import json
import logging
import sys

from math_verify import parse, verify


def parsed(s: str):
    out = parse(s, parsing_timeout=None)
    return out or parse(f"${s}$", parsing_timeout=None)


def main() -> None:
    logging.disable(logging.WARNING)  # math-verify warns on every call that its timeout is off
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold, pred = parsed(req["gold"]), parsed(req["pred"])
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
            out = {"ok": ok}
        except BaseException as e:  # MemoryError under RLIMIT_AS, sympy errors, ...
            out = {"error": f"{type(e).__name__}: {e}"[:300]}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
