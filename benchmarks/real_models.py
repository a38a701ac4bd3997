"""Real networks through actclust: one command, prints a table, writes JSON.

    python benchmarks/real_models.py            # every row (each in a fresh process)
    python benchmarks/real_models.py --rows resnet18,bert

Rows (trained once and cached under benchmarks/.cache):
- ``resnet18``: a torchvision-style ResNet-18 with BatchNorm (``actclust.models.resnet18``) trained
  briefly on Fashion-MNIST, explained over layer1..layer4 and fc;
- ``resnet18-dataparallel``, ``resnet18-compiled``, ``resnet18-bfloat16``: the same network wrapped
  in ``nn.DataParallel``, compiled with ``torch.compile`` (not run before the fit, so the compile
  of the hooked graph is part of the fit time), and as a half-precision copy (bfloat16: this CPU
  runs float16 convolutions about 60x slower than float32, so the float16 copy is tested in the
  suite on a small network, not benchmarked);
- ``bert``: a small Hugging Face ``BertForSequenceClassification`` trained on the synthetic token
  task of ``tests/zoo.py``, fed dict batches with attention masks, explained over its two encoder
  layers (``token_mean``), the pooler and the classifier.

For each row: fit time over one plain forward pass of the same model over the same training
inputs with the same batch size (measured in the same process right before the fit), test
fidelity and accuracy of the surrogate, and the peak resident memory the fit adds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/zoo.py

from _common import CACHE, RESULTS, PeakRSS, forward_seconds

from actclust import ActivationClustering
from actclust.datasets import load_fashion_mnist
from actclust.models import accuracy, resnet18, train_classifier

ROWS = ("resnet18", "resnet18-dataparallel", "resnet18-compiled", "resnet18-bfloat16", "bert")
RESNET_LAYERS = ["layer1", "layer2", "layer3", "layer4", "fc"]
BERT_LAYERS = {"bert.encoder.layer.0": "token_mean", "bert.encoder.layer.1": "token_mean",
               "bert.pooler": "mean", "classifier": "mean"}
BATCH = 256


def _cached(name: str, build, train):
    from safetensors.torch import load_file, save_file

    model = build()
    path = CACHE / f"{name}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    train(model)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def fashion_resnet(width: int, n_train: int, epochs: int):
    x, y, _, _ = load_fashion_mnist()
    return _cached(f"resnet18_w{width}_n{n_train}_e{epochs}", lambda: resnet18(1, 10, width=width),
                   lambda m: train_classifier(m, x[:n_train], y[:n_train], epochs=epochs, batch_size=128))


def token_bert(n_train: int):
    from zoo import tiny_bert, token_task, train_token_model

    ids, mask, y = token_task(n_train, seed=0)
    return _cached(f"bert_tokens_n{n_train}", tiny_bert, lambda m: train_token_model(m, ids, mask, y, epochs=10))


def run_row(row: str, args) -> dict:
    torch.manual_seed(0)
    if row == "bert":
        from zoo import token_task

        model = token_bert(args.bert_train)
        ids, mask, y = token_task(args.bert_train + args.bert_test, seed=1)
        x_fit = {"input_ids": ids[:args.bert_train], "attention_mask": mask[:args.bert_train]}
        x_test = {"input_ids": ids[args.bert_train:], "attention_mask": mask[args.bert_train:]}
        y_test = y[args.bert_train:].numpy()
        layers, reducer = list(BERT_LAYERS), BERT_LAYERS

        def forward(m):
            with torch.no_grad():
                for i in range(0, args.bert_train, BATCH):
                    m(**{k: v[i:i + BATCH] for k, v in x_fit.items()})
        dnn_acc = None
    else:
        model = fashion_resnet(args.width, args.train_images, args.epochs)
        x_tr, _, x_te, y_te = load_fashion_mnist()
        x_fit = torch.from_numpy(x_tr[:args.fit_images])
        x_test, y_test = x_te[:args.test_images], y_te[:args.test_images]
        layers, reducer = RESNET_LAYERS, "mean"
        dnn_acc = accuracy(model, x_test, y_test)
        if row == "resnet18-dataparallel":
            model = torch.nn.DataParallel(model)
        elif row == "resnet18-bfloat16":
            model = copy.deepcopy(model).bfloat16()
            x_fit = x_fit.bfloat16()

        def forward(m):
            forward_seconds(m, x_fit, BATCH)
    info = {"row": row, "model": type(model).__name__}
    if row == "resnet18-compiled":
        compiled = torch.compile(model, backend=args.compile_backend)
        t0 = time.perf_counter()
        forward(compiled)  # compiles the plain graph
        info["seconds_first_forward_with_compile"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        forward(compiled)
        baseline = time.perf_counter() - t0
        torch._dynamo.reset()  # a fresh compile with actclust's hooks, as for a model not yet run
        model = torch.compile(model, backend=args.compile_backend)
    else:
        forward(model)  # warm-up
        t0 = time.perf_counter()
        forward(model)
        baseline = time.perf_counter() - t0
    ac = ActivationClustering(model, layers, reducer=reducer, n_clusters=args.n_clusters, batch_size=BATCH,
                              progress=False)
    with warnings.catch_warnings(record=True) as caught, PeakRSS() as mem:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        ac.fit(x_fit)
        fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    score = ac.score(x_test, y_test)
    score_seconds = time.perf_counter() - t0
    info.update(
        n_fit=ac.n_samples_fit_, n_test=score["n"], layers=ac.layers_, forward_seconds=baseline,
        fit_seconds=fit_seconds, fit_over_forward=fit_seconds / baseline, score_seconds=score_seconds,
        fidelity=score["fidelity"], surrogate_accuracy=score["accuracy"], dnn_accuracy=score["dnn_accuracy"],
        dnn_accuracy_float32=dnn_acc, peak_added_mb=(mem.peak - mem.start) / 2**20,
        stored_vectors_mb=sum(v.nbytes for v in ac.train_vectors_.values()) / 2**20,
        per_layer_fidelity={l: s["fidelity"] for l, s in score["per_layer"].items()},
        warnings=sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught}),
    )
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--width", type=int, default=64, help="ResNet-18 width (64 = torchvision's)")
    ap.add_argument("--train-images", type=int, default=10000, help="Fashion-MNIST images the ResNet is trained on")
    ap.add_argument("--epochs", type=int, default=2, help="ResNet training epochs")
    ap.add_argument("--fit-images", type=int, default=5000, help="training images the surrogate is fitted on")
    ap.add_argument("--test-images", type=int, default=5000, help="test images it is scored on")
    ap.add_argument("--bert-train", type=int, default=3000, help="token-task sequences to train and fit on")
    ap.add_argument("--bert-test", type=int, default=1000, help="token-task sequences to score on")
    ap.add_argument("--n-clusters", type=int, default=15)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # run one row in this process, print JSON
    ap.add_argument("--out", default=str(RESULTS / "real_models.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.row:
        print("RESULT " + json.dumps(run_row(args.row, args)))
        return 0
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("rows", "row", "out")]
    results = []
    for row in rows:  # a fresh process per row: peak memory and compiled state are its own
        proc = subprocess.run([sys.executable, __file__, "--row", row, *passthrough], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{row}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            results.append({"row": row, "error": proc.stderr[-3000:]})
            continue
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"{row:<24} fit/fwd {r['fit_over_forward']:6.2f}  fidelity {r['fidelity']:.4f}  "
              f"acc {r['surrogate_accuracy']:.4f} (DNN {r['dnn_accuracy']:.4f})  peak +{r['peak_added_mb']:.0f} MiB",
              flush=True)
    print("\n| model | fit / forward | test fidelity | surrogate acc. | DNN acc. | peak memory added |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | failed | | | | |")
            continue
        print(f"| {r['row']} | {r['fit_over_forward']:.2f} | {r['fidelity']:.4f} | {r['surrogate_accuracy']:.4f} "
              f"| {r['dnn_accuracy']:.4f} | {r['peak_added_mb']:.0f} MiB |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "args": vars(args), "rows": results}, indent=2))
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
