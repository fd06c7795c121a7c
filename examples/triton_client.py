"""Call a Triton server that serves a repository made by `bitfit export-triton`, with tritonclient.http.

    docker run --rm -p 8000:8000 -v $PWD/REPO:/models nvcr.io/nvidia/tritonserver:24.10-py3 \
        tritonserver --model-repository=/models
    python examples/triton_client.py --repo REPO --task sentiment --text "A triumph." --text "Dull."

Tokenizes with the repository's tokenizer.json, sends every token input and each row's task id ([batch, 1],
as config.pbtxt declares it), and prints each row's answer (a label, or a regression task's score) from the first
`num_logits` logits of its task (tasks.json). `build_inputs` is what tests/test_triton.py checks against config.pbtxt and the model.
Needs numpy, tokenizers and tritonclient[http].
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def load_repo(repo: str | Path, model: str = "bitfit") -> tuple[dict, object]:
    from tokenizers import Tokenizer

    root = Path(repo) / model
    return json.loads((root / "tasks.json").read_text()), Tokenizer.from_file(str(root / "tokenizer.json"))


def build_inputs(tasks: dict, tokenizer, rows: list[tuple[str, str]]):
    """tritonclient InferInputs for rows of (task name, text), tasks mixed freely in one request."""
    import tritonclient.http as http

    by_name = {t["task"]: t for t in tasks["tasks"]}
    unknown = sorted({task for task, _ in rows} - set(by_name))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}: the repository serves {sorted(by_name)}")
    longest = max(by_name[task]["max_length"] for task, _ in rows)
    tokenizer.enable_truncation(longest)
    tokenizer.enable_padding(pad_id=tasks["pad_token_id"])
    encodings = tokenizer.encode_batch([text for _, text in rows])
    arrays = {"input_ids": np.array([e.ids for e in encodings], np.int64),
              "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
              "token_type_ids": np.array([e.type_ids for e in encodings], np.int64)}
    inputs = []
    for name in tasks["token_inputs"]:
        t = http.InferInput(name, list(arrays[name].shape), "INT64")
        t.set_data_from_numpy(arrays[name])
        inputs.append(t)
    ids = np.array([[by_name[task]["task_id"]] for task, _ in rows], np.int64)  # [batch, 1]: config reshapes
    t = http.InferInput("task_ids", list(ids.shape), "INT64")
    t.set_data_from_numpy(ids)
    inputs.append(t)
    return inputs


def answers(tasks: dict, rows: list[tuple[str, str]], logits: np.ndarray) -> list[str]:
    """Each row's answer from its task's real logits: a label name, or the score of a one-output task."""
    by_name = {t["task"]: t for t in tasks["tasks"]}
    out = []
    for (task, _), row in zip(rows, logits):
        t = by_name[task]
        if t["output"] != "logits":
            raise SystemExit(f"task {task!r} is a {t['task_kind']} task: its answers are in {t['output']}, "
                             "one per token; this example prints one answer per text")
        real = row[: t["num_logits"]]
        out.append(t["labels"][int(np.argmax(real))] if t["labels"] else f"{float(real[0]):.4f}")
    return out


def main() -> None:
    import tritonclient.http as http

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--url", default="127.0.0.1:8000")
    ap.add_argument("--model", default="bitfit")
    ap.add_argument("--task", required=True)
    ap.add_argument("--text", action="append", required=True)
    a = ap.parse_args()
    tasks, tokenizer = load_repo(a.repo, a.model)
    rows = [(a.task, text) for text in a.text]
    client = http.InferenceServerClient(a.url)
    result = client.infer(a.model, build_inputs(tasks, tokenizer, rows),
                          outputs=[http.InferRequestedOutput("logits")])
    for (_, text), label in zip(rows, answers(tasks, rows, result.as_numpy("logits"))):
        print(f"{label}\t{text}")


if __name__ == "__main__":
    main()
