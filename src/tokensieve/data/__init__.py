"""Data for the lab: tasks generated from a seed, long texts and calibration corpora (one text-source API), chat
prompts split where the question begins, fixed word lists, and a character tokenizer for tests."""
