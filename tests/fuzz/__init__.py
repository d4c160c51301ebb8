"""Coverage-guided fuzzing of the service's input path (atheris): see ``fuzz_inputs``."""
