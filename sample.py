"""Sample (and score) answers: teacher demonstrations and the student's own reasoning paths.

    python sample.py --model DIR --task arith --split train --prompt both --n 4 --temperature 0.8 --out samples.jsonl
    python sample.py --model TEACHER --task gsm8k --data train.jsonl --keep-correct --demos-out demos.jsonl --out t.jsonl
    python sample.py --from-rationales --task gsm8k --data train.jsonl --demos-out demos.jsonl
"""

from selfrefine.errors import cli_main
from selfrefine.recipes.sample import main

if __name__ == "__main__":
    cli_main(main)
