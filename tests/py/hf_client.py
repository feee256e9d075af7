#!/usr/bin/env python3
"""Runs one HuggingFace client call and prints what it got as one JSON line, so that a test can
run the same call against the Hub stand-in and against a mesh node and compare.

    hf_client.py snapshot REPO [--revision R] [--allow PATTERN]... [--repo-type dataset]
    hf_client.py download REPO FILE [--revision R] [--repo-type dataset]
    hf_client.py info REPO [--revision R]        # model_info; without --revision: no /revision/
    hf_client.py paths REPO FILE [--repo-type dataset]   # get_paths_info (a POST with a form)
    hf_client.py config REPO                     # transformers AutoConfig
    hf_client.py tokenizer REPO                  # transformers AutoTokenizer

The environment chooses the endpoint, cache and token (HF_ENDPOINT, HF_HOME, HF_TOKEN).
Output: {"ok": true, "seconds": s, ...what was got...} or
{"ok": false, "seconds": s, "error": "ClassName", "classes": [...MRO names...], "message": "..."}.
"""
import argparse
import hashlib
import json
import os
import sys
import time


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(args):
    import huggingface_hub as hf

    if args.op == "snapshot":
        folder = hf.snapshot_download(
            args.repo,
            revision=args.revision,
            allow_patterns=args.allow or None,
            repo_type=args.repo_type,
        )
        files = {}
        for root, _, names in os.walk(folder):
            for n in names:
                p = os.path.join(root, n)
                files[os.path.relpath(p, folder)] = sha256(p)
        return {"commit": os.path.basename(folder), "files": files}
    if args.op == "download":
        path = hf.hf_hub_download(
            args.repo, args.file, revision=args.revision, repo_type=args.repo_type
        )
        return {"sha256": sha256(path), "commit": path.split(os.sep)[-2 - args.file.count("/")]}
    if args.op == "info":
        info = hf.model_info(args.repo, revision=args.revision, files_metadata=True)
        siblings = sorted(
            [s.rfilename, s.size, s.blob_id, s.lfs.sha256 if s.lfs else None]
            for s in info.siblings
        )
        return {"sha": info.sha, "id": info.id, "gated": info.gated, "siblings": siblings}
    if args.op == "paths":
        infos = hf.HfApi().get_paths_info(args.repo, [args.file], repo_type=args.repo_type)
        return {"paths": [[i.path, getattr(i, "size", None), i.blob_id] for i in infos]}
    if args.op == "config":
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(args.repo)
        return {"model_type": c.model_type, "vocab_size": c.vocab_size}
    if args.op == "tokenizer":
        from transformers import AutoTokenizer

        t = AutoTokenizer.from_pretrained(args.repo)
        return {"class": type(t).__name__, "ids": t("hello mesh world fetching")["input_ids"]}
    raise SystemExit(f"unknown op {args.op}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op")
    p.add_argument("repo")
    p.add_argument("file", nargs="?")
    p.add_argument("--revision")
    p.add_argument("--allow", action="append")
    p.add_argument("--repo-type")
    args = p.parse_args()
    start = time.monotonic()
    try:
        out = {"ok": True, **run(args)}
    except Exception as e:  # the test compares exception classes
        out = {
            "ok": False,
            "error": type(e).__name__,
            "classes": [c.__name__ for c in type(e).__mro__],
            "message": str(e).splitlines()[0] if str(e) else "",
        }
    out["seconds"] = round(time.monotonic() - start, 3)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
