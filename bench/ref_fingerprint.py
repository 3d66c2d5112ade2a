"""What binding a reference cache to its model costs: ``model_fingerprint`` of a 7B-size folder vs.
a sha256 of its weights.

    python bench/ref_fingerprint.py [--reps 5]

The folder has LLaVA-1.5-7B's shape (3 safetensors shards, 14.3 GB of fp16 tensors: 32 decoder
layers, embeddings, LM head, a vision tower) written as sparse files, so the fingerprint's time is
its syscalls and hashing (its disk reads are 2 x 64 bytes per tensor; on a cold disk add one seek
per read). The sha256 is measured on 256 MiB in memory and scaled to the folder's size: the
floor of hashing the weights, before any disk read.
"""

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time


def write_folder(d):
    h, inter, layers, vocab = 4096, 11008, 32, 32064
    sizes = []
    for _ in range(layers):
        sizes += [h * h] * 4 + [h * inter] * 3 + [h] * 2
    sizes += [vocab * h] * 2 + [h] + [1 << 22] * 96
    for s in range(3):
        header, off = {}, 0
        for k, n in enumerate(sizes[s::3]):
            header[f"t{s}_{k}"] = {"dtype": "F16", "shape": [n], "data_offsets": [off, off + 2 * n]}
            off += 2 * n
        hb = json.dumps(header).encode()
        with open(os.path.join(d, f"model-{s:05d}-of-00003.safetensors"), "wb") as f:
            f.write(len(hb).to_bytes(8, "little"))
            f.write(hb)
            f.truncate(8 + len(hb) + off)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "llava"}, f)
    return len(sizes)


def main():
    from bpo_fast.train.ref_cache import model_fingerprint

    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        n = write_folder(d)
        size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            model_fingerprint(d)
            times.append(time.perf_counter() - t0)
    buf = os.urandom(1 << 28)
    t0 = time.perf_counter()
    hashlib.sha256(buf).hexdigest()
    rate = len(buf) / (time.perf_counter() - t0)
    print(f"model_fingerprint: {n} tensors, {size / 1e9:.1f} GB: median "
          f"{statistics.median(times) * 1e3:.1f} ms over {args.reps} runs")
    print(f"sha256: {rate / 1e9:.2f} GB/s -> {size / rate:.1f} s for the same {size / 1e9:.1f} GB "
          "(from memory)")


if __name__ == "__main__":
    main()
