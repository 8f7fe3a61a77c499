"""What the recipes share and a library user does not need: command-line parsing (:mod:`.cli`), the baselines a
distilled student is compared with (:mod:`.baselines`), the results tables (:mod:`.tables`) and the ``--scheme``
flags (:mod:`.schemes`). The layer above the schemes: nothing else under ``hf_kd/`` imports it."""
