"""Load preference pairs from the files users already have.

Every input is normalized to :class:`preftune.types.PreferencePair`:

* ``prompt`` -- a plain ``str`` for text-completion data (the *standard* format with a
  string prompt), otherwise a list of ``{"role", "content"}`` messages ending with a user
  message (a leading system message and earlier turns are allowed).
* ``chosen`` / ``rejected`` -- the assistant replies as text.
* ``source`` -- where the pair came from, used in errors and later warnings:

  ========================  ==========================================================
  file type                 ``source``
  ========================  ==========================================================
  ``.jsonl``                ``data.jsonl:7`` -- 1-based line number
  ``.json`` (array)         ``prefs.json:14 (record 3)`` -- line where the record's
                            ``{`` starts, and its 1-based index in the array
  ``.json`` (JSON Lines)    ``prefs.json:7`` -- as for ``.jsonl``
  ``.csv``                  ``data.csv:4`` -- line where the row starts; the header is
                            line 1, so the first data row is line 2 (the same number a
                            spreadsheet shows as the row number unless a cell spans
                            several lines)
  ``.parquet``              ``data.parquet row 3`` -- 1-based record index
  ``save_to_disk`` dir      ``ds row 3`` (``Dataset``) or ``ds/train row 3``
                            (``DatasetDict``, split ``train``) -- 1-based record index
  ========================  ==========================================================

The same content in any format normalizes to the same pair: alpaca
``{"instruction": "Hi", "input": "", ...}``, conversational
``{"prompt": [{"role": "user", "content": "Hi"}], ...}`` and sharegpt
``{"conversations": [{"from": "human", "value": "Hi"}], ...}`` all give
``prompt=[{"role": "user", "content": "Hi"}]``; a system prompt becomes a leading
``{"role": "system"}`` message.  Standard string prompts stay strings (the tokenizer stage
wraps them as a user message when the model has a chat template).

Bad data raises :class:`PreftuneError` with one line naming the file, the line/row and
the field.  Pairs whose chosen and rejected replies are identical are *not* rejected here;
the tokenizer stage drops and counts them.

Modules: :mod:`~preftune.data.readers` (files -> records with their source),
:mod:`~preftune.data.formats` (records -> pairs), :mod:`~preftune.data.llamafactory`
(``dataset_info.json`` and LLaMA-Factory config keys), :mod:`~preftune.data.load` (the
entry points re-exported here).
"""

from preftune.data.formats import FORMATS, detect_format
from preftune.data.llamafactory import load_llamafactory
from preftune.data.load import load_pairs, require_eval_pairs, split_eval
from preftune.data.readers import FILE_TYPES

__all__ = [
    "FORMATS",
    "FILE_TYPES",
    "load_pairs",
    "load_llamafactory",
    "detect_format",
    "split_eval",
    "require_eval_pairs",
]
