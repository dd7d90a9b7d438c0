"""Evaluate a model (+ adapter) on one or more tasks, greedy, with 95% intervals.

    python eval.py --model DIR --task arith --task arith_ood --out runs/eval.json
    python eval.py --model DIR --adapter runs/dpo/adapter --task gsm8k --data test.jsonl --limit 200 --out gsm8k.json
    python eval.py --compare runs/sft.arith.predictions.jsonl runs/dpo.arith.predictions.jsonl   # paired, per task
"""

from selfrefine.errors import cli_main
from selfrefine.recipes.eval import main

if __name__ == "__main__":
    cli_main(main)
