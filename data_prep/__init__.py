"""Data-prep jobs: turn what users have into the TRL-standard datasets the `sft`, `dpo` and `upo` stages read.

Jobs (each `python -m data_prep.<job>` or `posttrain data <job>`): `build_sft_set`, `build_preference_set`,
`validate`, `extract_hhh_alignment`. Shared code: `config` (options), `readers` (files -> rows), `formats`,
`messages` and `images` (rows -> records), `clean` (filters), `build` (the pipeline), `card` (output folder and data
card).
"""
