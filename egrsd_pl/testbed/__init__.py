"""The offline testbed: a tokenizer, a tiny Qwen3 and synthetic math, built and warm-started locally.

Nothing is downloaded: ``build_testbed`` trains a byte-level BPE with Qwen3's special tokens and
chat template on synthetic arithmetic word problems, builds a ~0.5 M-parameter
``Qwen3ForCausalLM``, fine-tunes it on one CPU thread for a fixed number of steps on a mix of concise, verbose and
privileged (reference-solution) chains of thought, and saves an ordinary Hugging Face folder that
``from_pretrained`` and vLLM load. The build is deterministic, and the default one ships in the
package (``egrsd_pl/testbed/tiny``): ``model_name_or_path: testbed:tiny`` in a config resolves to it;
other budgets and seeds are built on first use and cached (``python -m egrsd_pl.testbed build``).
``testbed:mechanism`` (:mod:`egrsd_pl.testbed.mechanism`, built on first use) is the same builder on a
world whose privileged teacher is concise *and* uncertain where the reference does not decide (the order of
independent sub-computations, interchangeable phrasings): the entropy gate's premise.
``testbed:qwen3-shape`` (:mod:`egrsd_pl.testbed.qwen3_shape`) is a random-weight model at Qwen3's
vocabulary, special ids and chat template, for rehearsing the paper configs on CPU.
"""

from egrsd_pl.testbed.build import (
    DEFAULT_BUDGET_S,
    TESTBED_VERSION,
    build_testbed,
    cached_testbed_dir,
    default_cache_dir,
    ensure_testbed,
    packaged_testbed_dir,
    resolve_model_path,
)
from egrsd_pl.testbed.synthetic import synthetic_problems

__all__ = [
    "DEFAULT_BUDGET_S",
    "TESTBED_VERSION",
    "build_testbed",
    "default_cache_dir",
    "ensure_testbed",
    "packaged_testbed_dir",
    "resolve_model_path",
    "synthetic_problems",
    "cached_testbed_dir",
]
