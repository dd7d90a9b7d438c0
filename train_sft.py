"""Stage 1 of Self-Refine Instruction-Tuning: supervised fine-tuning on teacher demonstrations.

    python train_sft.py --model DIR --data DEMOS.jsonl --out runs/sft [--lora-r 16 | --full] --merge
"""

from selfrefine.errors import cli_main
from selfrefine.recipes.sft import main

if __name__ == "__main__":
    cli_main(main)
