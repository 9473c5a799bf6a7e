class DataError(ValueError):
    """Bad task spec or data file; the message names the task, the file and the row."""
