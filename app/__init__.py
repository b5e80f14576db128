"""The re-ID service: enroll crops of known people, ask who a new crop is, see the attention masks."""
