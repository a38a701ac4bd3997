"""Build ``trials.csv`` from the authors' release of Taesiri, Nguyen & Nguyen (NeurIPS 2022).

    python benchmarks/data/taesiri2022_cub/build_table.py PATH/TO/CUB-Human-Study-Summary.csv

The input is ``Human-Study/data/CUB-Human-Study-Summary.csv`` of github.com/anguyen8/visual-correspondence-XAI
(MIT licence; see README.md here): one row per answer, 362 participants x 30 birds. This keeps
the participants the paper analysed, as the authors' ``Human-Study/src/CUB-Base.ipynb`` does
(``df = df.drop(df[df.Accuracy <= 0.5].index)``: participants at or below chance are left out),
numbers them in the order they appear, and writes one row per answer:

    participant   P001 ... (the Prolific ids are not copied)
    condition     the explanation method: ResNet-50 (no explanation), kNN, EMD-NN, EMD-Corr, CHM-NN, CHM-Corr
    item          the CUB test image
    ai_correct    ClassifierCorrectness: whether that method's classifier was right
    decision      accept / reject: the participant's answer to "is the AI's label right?", recovered from
                  Correctness (1 when the answer was right), accept = (Correctness == ClassifierCorrectness)

Only the standard library is used, so that the table can be rebuilt anywhere.
"""

import csv
import sys
from pathlib import Path

OUT = Path(__file__).with_name("trials.csv")


def build(source: Path, out: Path = OUT) -> dict:
    with source.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if float(r["Accuracy"]) > 0.5]  # the paper's exclusion (CUB-Base.ipynb)
    numbers: dict = {}
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["participant", "condition", "item", "ai_correct", "decision"])
        for r in kept:
            who = numbers.setdefault(r["UID"], f"P{len(numbers) + 1:03d}")
            right, answered_right = int(r["ClassifierCorrectness"]), int(r["Correctness"])
            w.writerow([who, r["Method"], r["Query"], right, "accept" if answered_right == right else "reject"])
    return {"rows_in": len(rows), "participants_in": len({r["UID"] for r in rows}), "rows_out": len(kept),
            "participants_out": len(numbers)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1])
    print(build(Path(sys.argv[1])))
