"""``wanwu backfill``: push a directory (or a list) of images through a running gateway.

Files go in batches to ``POST /v1/models/<name>/predict:batch`` (``embed:batch`` for an
embedding model: one line per file with its vector) at ``batch`` priority,
a few requests in flight at once, and each answer becomes one JSON line per file in the
results file. The job can stop at any moment (Ctrl-C, a crash, a power cut) and the same
command resumes it. Every file ends up in the results exactly once:

- One job at a time writes a results file (an exclusive ``flock`` held for the run).
- On start the file's complete lines name the files already done; they are skipped. A
  last line without its newline is the remains of a write cut short: it is truncated
  away, so its file is redone and appears once.
- In a run each file is in one batch, and a line is written only once a file has its
  final answer (a result, or an error that retrying cannot fix). What is being retried,
  what failed transiently more than ``--max-retries`` times (counted in the summary as
  left for the next run), and what is still in flight when the job stops, is not
  written, so a rerun redoes it.
- The options that shape a line (model, top_k, lang) are kept beside the results, in
  ``<results>.options.json``; resuming with others is refused (``OptionsMismatch``).
- The directory is fsynced once the results file (or the options file) is created, so
  the file's name survives a power cut as its lines do.
- The lines of one answer are written whole with one ``write`` to a file opened with
  ``O_APPEND``; a second Ctrl-C waits for a write in progress before leaving. Only a
  process killed in the middle of a write can leave a partial line, and only at the end,
  where the next run repairs it.

The package, by concern:

- ``source``: the files to classify (``Source``): a directory walked (``walk``, with
  ``glob_matcher`` for ``--glob``) or a list file (``read_list``), each under its key.
- ``results``: the results file (``ResultsFile``): its lock, recovery on start
  (``Recovered``), whole-line appends and fsyncs, and the options record beside it
  (``changed_options``).
- ``job``: the job's ``Options``, and ``Backfill``, whose calling thread discovers the
  model and limits, settles the options record, feeds batches and shows progress;
  ``interrupts`` for Ctrl-C and SIGTERM.
- ``sending``: the sending threads (``Sender``, the other half of ``Backfill``): reading
  files, batches within the upload limits, retries, writing the answers.
- ``protocol``: talking to the gateway: its ``Limits``, ``judge`` of a batch answer
  (``Reply``), the ``Backoff`` between tries.
- ``report``: the run's ``Summary`` (exit status, ``--summary-json``), the progress line
  and the ``Reporter`` that prints them.
- ``errors``: ``BackfillError``, ``OptionsMismatch``, and ``RESUME_HINT``.
"""

from .errors import RESUME_HINT, BackfillError, OptionsMismatch
from .job import Backfill, Options, interrupts
from .protocol import Backoff, Limits, Reply, judge
from .report import Reporter, Summary, format_progress
from .results import (
    CONTENT_OPTIONS,
    OPTIONS_SUFFIX,
    OPTIONS_VERSION,
    Recovered,
    ResultsFile,
    changed_options,
    encode_line,
    fsync_directory,
)
from .sending import ANSWER_EXTRAS, PART_OVERHEAD, PRIORITY_HEADER, Item, Sender
from .source import IMAGE_EXTENSIONS, Source, glob_matcher, read_list, walk

__all__ = [
    "ANSWER_EXTRAS",
    "CONTENT_OPTIONS",
    "IMAGE_EXTENSIONS",
    "OPTIONS_SUFFIX",
    "OPTIONS_VERSION",
    "PART_OVERHEAD",
    "PRIORITY_HEADER",
    "RESUME_HINT",
    "Backfill",
    "BackfillError",
    "Backoff",
    "Item",
    "Limits",
    "Options",
    "OptionsMismatch",
    "Recovered",
    "Reply",
    "Reporter",
    "ResultsFile",
    "Sender",
    "Source",
    "Summary",
    "changed_options",
    "encode_line",
    "format_progress",
    "fsync_directory",
    "glob_matcher",
    "interrupts",
    "judge",
    "read_list",
    "walk",
]
