"""Load saved directories with transformers alone, in a process where svdkit cannot be imported.

Run by the export tests as ``python -I plain_transformers_load.py JOBS.json RESULTS.pt``.
``JOBS.json`` holds ``{"ids": path of a saved tensor of token ids, "jobs": [...]}``; each job
names a directory and what to do with it:

- ``"causal"``: ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``: its class,
  dtype, loading info (missing / unexpected keys), logits and greedy tokens;
- ``"base"``: ``AutoModel.from_pretrained(dir, trust_remote_code=True)``: the last hidden state;
- ``"refuse"``: the errors of ``from_pretrained`` without ``trust_remote_code`` (None and False);
- ``"resave"``: ``save_pretrained`` of the loaded model to a new directory, loaded again: its logits;
- ``"tokenize"``: ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True)`` on the job's ``text``.

Results go to ``RESULTS.pt`` (``torch.save``) keyed by job name; an exception becomes
``{"error": "Type: message"}``. The comparison with svdkit's own loader happens in the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

# Everything that could make svdkit importable goes: its source tree, the editable install's path.
sys.path[:] = [p for p in sys.path if p and not os.path.isdir(os.path.join(p, "svdkit"))]
sys.meta_path[:] = [finder for finder in sys.meta_path if "svdkit" not in repr(finder).lower()]

import torch  # noqa: E402
import transformers  # noqa: E402

GENERATE = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


def _error(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}"}


def _causal(directory: str, ids: torch.Tensor) -> dict:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        logits = model(ids).logits
    return {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "dtype": str(model.dtype),
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
        "logits": logits,
        "tokens": model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **GENERATE),
        "low_rank": sorted(name for name, module in model.named_modules() if type(module).__name__ == "LowRankLinear"),
    }


def _base(directory: str, ids: torch.Tensor) -> dict:
    model, info = transformers.AutoModel.from_pretrained(directory, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    return {"class": type(model).__name__, "missing": sorted(info["missing_keys"]), "hidden": hidden}


def _refuse(directory: str, ids: torch.Tensor) -> dict:
    out = {}
    for trust in (None, False):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust)
        except Exception as exc:  # what transformers raises is the point
            out[str(trust)] = _error(exc)["error"]
        else:
            out[str(trust)] = f"loaded a {type(model).__name__}"
    return out


def _resave(directory: str, ids: torch.Tensor, target: str) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    model.save_pretrained(target)
    again, info = transformers.AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True, output_loading_info=True)
    with torch.no_grad():
        logits = again(ids).logits
    return {"files": sorted(os.listdir(target)), "missing": sorted(info["missing_keys"]), "logits": logits, "directory": target}


def _tokenize(directory: str, text: str) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    return {"class": type(tokenizer).__name__, "ids": tokenizer(text)["input_ids"]}


def main(jobs_path: str, results_path: str) -> None:
    torch.set_num_threads(1)
    spec = json.loads(open(jobs_path, encoding="utf-8").read())
    ids = torch.load(spec["ids"])
    results = {"svdkit_importable": importlib.util.find_spec("svdkit") is not None, "transformers": transformers.__version__}
    for job in spec["jobs"]:
        action = job["action"]
        try:
            if action == "resave":
                results[job["name"]] = _resave(job["directory"], ids, job["target"])
            elif action == "tokenize":
                results[job["name"]] = _tokenize(job["directory"], job["text"])
            else:
                results[job["name"]] = {"causal": _causal, "base": _base, "refuse": _refuse}[action](job["directory"], ids)
        except Exception as exc:  # reported to the test, which names the job
            results[job["name"]] = _error(exc)
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
