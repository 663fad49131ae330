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

# The extraction's own parts, on made-up input (the packages of the larger domains are not
# installed by `make test`): the size caps, and the PostgreSQL manual's HTML made text.
sys.path.insert(0, os.path.join(src, "scripts"))
import corpora

with tempfile.TemporaryDirectory() as tmp:
    corpora.DOMAINS["made-up"] = lambda: corpora.in_hash_order([(f"doc{i}", f"document {i} " * 50) for i in range(400)])
    corpora.MAX_TRAIN_BYTES, corpora.MAX_HELDOUT_BYTES = 20_000, 2_000
    sys.argv = ["corpora.py", tmp, "made-up"]
    corpora.main()
    train = open(os.path.join(tmp, "made-up", "train.txt")).read()
    held = open(os.path.join(tmp, "made-up", "heldout.txt")).read()
    doc = len(("document 399 " * 50).encode()) + 2
    assert 20_000 <= len(train) < 20_000 + doc, f"train.txt is {len(train)} bytes, capped at 20,000"
    assert 2_000 <= len(held) < 2_000 + doc, f"heldout.txt is {len(held)} bytes, capped at 2,000"
    keys = [d.split()[1] for d in train.split("\n\n") if d.strip()]
    assert keys != sorted(keys, key=int), "documents not in hash order"

page = corpora.ManualPage()
page.feed('<html><head><title>T</title></head><body><div class="navheader"><table><tr><td>Prev</td></tr>'
          '</table></div><h2>9.1. Joins</h2><p>A   join\n combines rows.</p><table><tr><th>Name</th><th>Kind</th>'
          '</tr></table><pre>SELECT *\n  FROM a JOIN b;</pre><div class="navfooter">Next</div></body></html>')
got = page.text()
want = "9.1. Joins\nA join combines rows.\nName\tKind\nSELECT *\n  FROM a JOIN b;"
assert got == want, f"the manual page became {got!r}, not {want!r}"
print("ok: size caps, hash order and the manual's HTML as text")
