"""The pipeline wing: an ``iterate`` run's stage graph (``plan``), its ledger of stage records
and fingerprints (``ledger``), running it (``run``), and reading it (``status``, ``report``)."""
