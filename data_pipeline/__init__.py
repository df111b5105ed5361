"""Teacher-data generation: OpenVidHD prompts (`prompts`), the Wan teacher (`teacher`), and the Ray
job that turns one into shards of the other (`gen_teacher`)."""
