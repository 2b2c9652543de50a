"""Text processing behind ``scripts/prepare-wikitext103.sh`` and ``scripts/prepare-wmt14-en-de.sh``.

Each module is a command-line tool (``python -m fairseq_agg.prepare.<module> -h``) that works on
text files with a pool of worker processes and shows a progress bar. The scripts run them as
files (``python fairseq_agg/prepare/<module>.py``), which skips the package's import of fairseq.

* :mod:`~fairseq_agg.prepare.gpt2_bpe`: GPT-2 byte-level BPE, as fairseq's RoBERTa recipe
  (``examples/roberta/multiprocessing_bpe_encoder.py``, which fairseq's pip package lacks);
* :mod:`~fairseq_agg.prepare.sentencepiece_bpe`: train a sentencepiece model and encode with it;
* :mod:`~fairseq_agg.prepare.wmt`: Moses-style normalisation and tokenisation (sacremoses),
  segment extraction from WMT ``.sgm`` files, and corpus cleaning as Moses' ``clean-corpus-n.perl``.
"""
