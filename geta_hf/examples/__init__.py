"""Examples built on the library, outside its import path: ``import geta_hf`` never loads them.

* :mod:`geta_hf.examples.demo` -- the offline demo behind ``geta-hf demo``;
* :mod:`geta_hf.examples.data` -- the SQuAD-format data generator, SQuAD JSON I/O and the
  Hugging Face extractive-QA pre/post-processing;
* :mod:`geta_hf.examples.tasks` -- QA features, EM/F1 evaluation, latency, and the
  question-answering ``Trainer`` mixin used by ``scripts/run_qa.py``.

They lived at ``geta_hf.demo``, ``geta_hf.data`` and ``geta_hf.tasks`` before; those names still
import (with a ``DeprecationWarning``) for one release.
"""
