"""The deployment runtime works on a box without torch, transformers or the ONNX graph tools.

A subprocess installs an import blocker before anything else is imported, then serves a pack and runs
the `predict` and `inspect` commands.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLOCKER = textwrap.dedent("""
    import sys

    BLOCKED = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript")

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                # what Python raises for a package that is not installed
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
""")


def run_blocked(body: str, *args: str) -> subprocess.CompletedProcess:
    code = BLOCKER + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_blocker_blocks():
    proc = run_blocked("""
        for name in ("torch", "transformers", "onnx", "onnx_ir", "onnxscript", "torch.nn"):
            try:
                __import__(name)
            except ImportError:
                continue
            raise SystemExit(f"{name} imported")
        print("blocked")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blocked"


def test_runtime_serves_packs_without_torch(bert_compiled, pack_all, pack_scores):
    proc = run_blocked("""
        import json, sys
        import bitfit.runtime as runtime
        from bitfit.cli import main

        compiled, pack, scores = sys.argv[1:4]
        session = runtime.load(compiled, [pack, scores])
        task, reg = (runtime.read_pack_manifest(p).task for p in (pack, scores))
        texts = ["a good fun movie", "awful", "who won the prize money"]
        out = session.run(task, texts)
        value = session.run(reg, texts)
        print(json.dumps({
            "logits": list(out.logits.shape), "scores": list(out.scores.shape), "labels": out.labels,
            "label_names": out.label_names, "reg": list(value.logits.shape),
        }))
        rc_predict = main(["predict", "--compiled", compiled, "--pack", pack, "--text", "good", "--text", "bad",
                           "--json"])
        rc_inspect = main(["inspect", pack])
        rc_inspect_compiled = main(["inspect", compiled])
        print(json.dumps({"rc": [rc_predict, rc_inspect, rc_inspect_compiled]}))
        blocked = ("torch", "transformers", "onnx", "onnx_ir", "onnxscript")
        print(json.dumps({"loaded": sorted(m for m in sys.modules if m.split(".")[0] in blocked)}))
    """, str(bert_compiled), str(pack_all), str(pack_scores))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    summary, *predictions = lines[0], *lines[1:]
    assert summary["logits"] == [3, 2] and summary["scores"] == [3, 2] and summary["reg"] == [3, 1]
    assert set(summary["labels"]) <= set(summary["label_names"]) and len(summary["labels"]) == 3
    records = [r for r in predictions if "label" in r]
    assert len(records) == 2 and all(set(r) == {"label", "scores", "logits"} for r in records)
    assert {"rc": [0, 0, 0]} in lines
    assert {"loaded": []} in lines
    assert "task pack" in proc.stdout and "compiled model" in proc.stdout  # inspect's output
    assert "Traceback" not in proc.stderr


def test_commands_needing_torch_say_what_to_install(bert_compiled, pack_all):
    proc = run_blocked("""
        import sys
        from bitfit.cli import main
        sys.exit(main(["verify", "--compiled", sys.argv[1], "--pack", sys.argv[2]]))
    """, str(bert_compiled), str(pack_all))
    assert proc.returncode == 2
    assert "error: needs torch; install the training extra: pip install 'bitfit-deploy[train]'" in proc.stderr
    assert "Traceback" not in proc.stderr
