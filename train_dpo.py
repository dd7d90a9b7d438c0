"""Stage 2 of Self-Refine Instruction-Tuning: DPO on the student's own reasoning paths.

    python train_dpo.py --model runs/sft/merged --samples samples.jsonl --demos demos.jsonl --out runs/dpo --merge
    python train_dpo.py --model runs/sft/merged --pairs pairs.jsonl --out runs/dpo --beta 0.1 --precompute-ref
"""

from selfrefine.errors import cli_main
from selfrefine.recipes.dpo import main

if __name__ == "__main__":
    cli_main(main)
