"""Queue names, key prefixes and collection names, in one place."""

INVOCATIONS_QUEUE = "conveyor.invocations"
DEAD_LETTER_EXCHANGE = "conveyor.dead-letter"
DEAD_LETTER_QUEUE = "conveyor.invocations.dead"

CACHE_PREFIX = "conveyor:"
RESULT_KEY_PREFIX = CACHE_PREFIX + "result:"
FINISHED_CHANNEL = CACHE_PREFIX + "finished"

KEYS_COLLECTION = "keys"
FUNCTIONS_COLLECTION = "functions"
INVOCATIONS_COLLECTION = "invocations"
