from django.db import migrations

# The audit log is append-only at the database level: row UPDATE and DELETE raise, whoever issues them.
# (TRUNCATE is a table owner's operation, used by the test suite's flush; grant the app role no TRUNCATE.)
SQL = """
CREATE OR REPLACE FUNCTION registry_auditevent_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only: % on registry_auditevent is refused', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER registry_auditevent_append_only
    BEFORE UPDATE OR DELETE ON registry_auditevent
    FOR EACH ROW EXECUTE FUNCTION registry_auditevent_refuse_change();
"""
REVERSE = """
DROP TRIGGER IF EXISTS registry_auditevent_append_only ON registry_auditevent;
DROP FUNCTION IF EXISTS registry_auditevent_refuse_change();
"""


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]
    operations = [migrations.RunSQL(SQL, REVERSE)]
