#!/usr/bin/python3
"""The held-out split of scripts/corpora.py is deterministic (two extractions are byte-identical)
and disjoint (no held-out document is also a training document), with about 5% held out.
Runs on the KJV domain, which `make test` installs. usage: corpora_split_test.py SOURCE_DIR"""
import hashlib, os, subprocess, sys, tempfile

src = sys.argv[1]
with tempfile.TemporaryDirectory() as tmp:
    digests = []
    for run in ("a", "b"):
        subprocess.run([sys.executable, os.path.join(src, "scripts/corpora.py"), os.path.join(tmp, run), "kjv"],
                       check=True, stdout=subprocess.DEVNULL)
        digests.append({f: hashlib.sha256(open(os.path.join(tmp, run, "kjv", f), "rb").read()).hexdigest()
                        for f in ("train.txt", "heldout.txt")})
    assert digests[0] == digests[1], f"two extractions differ: {digests}"

    def docs(f):
        return [d for d in open(os.path.join(tmp, "a", "kjv", f), encoding="utf-8").read().split("\n\n") if d.strip()]

    train, held = docs("train.txt"), docs("heldout.txt")
    both = set(train) & set(held)
    assert not both, f"{len(both)} documents are both trained on and held out, e.g. {next(iter(both))[:80]!r}"
    share = len(held) / (len(train) + len(held))
    assert 0.02 <= share <= 0.10, f"held-out share {share:.3f} is not about 5%"
    print(f"ok: {len(train)} train and {len(held)} held-out documents ({share:.1%}), identical across two runs")
