-- Fails with a row for each account and resource whose last successful run ended longer ago
-- than the freshness error threshold, or that never succeeded (see ../../README.md).
select account, resource, status, error, last_success_at, seconds_since_success
from {{ source('ideogram_sync', 'sync_runs_latest') }}
where seconds_since_success is null
   or seconds_since_success > {{ var('ideogram_sync_error_after_hours', 6) * 3600 }}
