"""The durable record: schema, engine setup, migrations, the hash-chained ledger."""
