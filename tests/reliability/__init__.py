"""The reliability suite: faults and bad input lose nothing.

Real `dropkiln daemon` subprocesses on real SQLite files, the tiny model at 64×64:

- test_kill9: kill -9 at random points of each stage and at every fault point, through
  dataset → LoRA → prompt file using it → images → video; the outputs equal an
  undisturbed run's, bit for bit.
- test_bad_inputs: the bad-input corpus (corpus*.py), one entry a case; each outcome
  (drop rejected, drop taken but its job failed, image rejected, image normalised) is
  counted from what the daemon did and checked apart.
- test_oom: out of memory at every GPU fault point, once (one rung down) and at every rung;
  the points inside a forward, a backward and a VAE decode raise every real message form.
- test_disk_full: torn writes (ENOSPC part-way through a file) after each kind of write
  point, and a real full tmpfs.
- test_artifact_records: a kill between a PNG and its record loses no record.
- test_contention: a full-speed writer, three followers and the dashboard at once.
- test_sigterm: systemctl stop mid-training, then resume.

Short form (in CI): ``python -m pytest tests/reliability``. Long form, with two dozen random
kills and every always-failing OOM run: ``python -m pytest tests/reliability --full``.
"""
