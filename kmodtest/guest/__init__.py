"""Guest stage: the agent channel, the testinfra backend, kernel health and topology."""
