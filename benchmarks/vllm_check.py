"""Start vLLM from a `retain export` folder's vllm.json and ask each adapter once (GPU machine).

    python3 benchmarks/vllm_check.py EXPORT_DIR [--port 8011] [--timeout 240]

Exit 0: vLLM listed every exported adapter and answered a completion with each. Exit 3: vLLM
is not installed here (nothing was checked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--timeout", type=int, default=240)
    args = ap.parse_args()
    if importlib.util.find_spec("vllm") is None:
        print("vllm is not installed here: the manifest was not checked")
        return 3
    manifest = json.loads((args.export_dir / "vllm.json").read_text())
    proc = subprocess.Popen([*manifest["command"], "--port", str(args.port)], cwd=args.export_dir)
    url = f"http://127.0.0.1:{args.port}/v1"
    try:
        deadline = time.time() + args.timeout
        while True:
            try:
                served = {m["id"] for m in get(f"{url}/models")["data"]}
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    print(f"vLLM did not come up (exit code {proc.poll()})")
                    return 1
                time.sleep(2)
        missing = set(manifest["lora_modules"]) - served
        print(json.dumps({"served": sorted(served), "missing": sorted(missing)}))
        for name in manifest["lora_modules"]:
            answer = get(f"{url}/completions", {"model": name, "prompt": "Is 481 an even number?", "max_tokens": 4,
                                                "temperature": 0})
            print(json.dumps({"adapter": name, "text": answer["choices"][0]["text"]}))
        return 1 if missing else 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
