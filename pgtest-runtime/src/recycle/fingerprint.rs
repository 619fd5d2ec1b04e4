//! The catalog's side of a test's database: its fingerprint (what a
//! schema change alters), the catalogs whose counts of rows written tell
//! whether the fingerprint is worth computing, the large objects, and what
//! the planner reads of a table besides its rows (its rows' places,
//! `pg_class` statistics, statistics rows), as the snapshot records it and
//! a reset compares it.

/// The session settings every comparison runs under, so that rows and
/// statistics print the same whatever the test's session had set.
pub(super) const FORMATS: &str = "set local datestyle = 'ISO, YMD'; set local timezone = 'UTC'; \
    set local intervalstyle = 'postgres'; set local extra_float_digits = 3; \
    set local bytea_output = 'hex'; set local lock_timeout = 2000; \
    set local search_path = pg_catalog; set local quote_all_identifiers = off";

/// The hash of a relation's rows as text with their places, in physical
/// order.
pub(super) fn rows_hash(name: &str) -> String {
    format!(
        "(select md5(coalesce(string_agg(x.ctid::text || ' ' || x::text, E'\\n' order by x.ctid), \
         '')) from only {name} x)"
    )
}

/// The hash of a relation without rows: md5 of the empty string.
pub(super) const EMPTY_HASH: &str = "d41d8cd98f00b204e9800998ecf8427e";

/// The `pg_class` statistics the planner reads of the relation `alias`, as
/// text, on a server of version `major` (18 adds `relallfrozen`).
pub(super) fn class_of(alias: &str, major: u32) -> String {
    let frozen = match major >= 18 {
        true => format!(", {alias}.relallfrozen"),
        false => String::new(),
    };
    format!("concat_ws(',', {alias}.relpages, {alias}.reltuples, {alias}.relallvisible{frozen})")
}

/// Each table's (or materialized view's) statistics rows, its indexes'
/// and its extended statistics' data, as the md5 of their text, and
/// whether extended statistics data is among them: `(table oid, hash,
/// extended)`. Before PostgreSQL 15, an extended statistics object has
/// its data row from its creation on, empty until an `ANALYZE`: only one
/// with data counts.
pub(super) const STATISTICS_FOUND: &str = "select t::int8, \
        md5(string_agg(r, E'\\n' order by r)), bool_or(extended) from ( \
        select coalesce(i.indrelid, s.starelid) as t, s::text as r, false as extended \
            from pg_statistic s left join pg_index i on i.indexrelid = s.starelid \
            where s.starelid >= 16384 \
        union all select e.stxrelid, d::text, true from pg_statistic_ext_data d \
            join pg_statistic_ext e on e.oid = d.stxoid where e.stxrelid >= 16384 \
            and exists (select from jsonb_each(to_jsonb(d) - 'stxoid' - 'stxdinherit') \
                where value <> 'null') \
    ) rows group by t";

/// The catalog's fingerprint: every object a schema change makes or
/// touches (user objects, from `FirstNormalObjectId` on, with their
/// dependencies; every schema; what a test may alter in place: text
/// search, languages, access methods, foreign data, publications, the
/// privileges and settings of built-in objects), in every schema but
/// temporary ones and TOAST's (whose tables a refresh or truncation makes
/// anew), without what changes on its own (statistics; the missing values
/// of columns added with a default, which a table's rewrite clears).
pub(super) const FINGERPRINT: &str = "with hidden as (select oid from pg_namespace where nspname = 'pg_toast' \
        or nspname like 'pg\\_temp\\_%' or nspname like 'pg\\_toast\\_temp\\_%'), \
    rel as (select oid from pg_class where oid >= 16384 \
        and relnamespace not in (select oid from hidden)) \
    select md5(string_agg(part, E'\\n' order by part)) from ( \
    select 'class ' || (c.oid, relname, relnamespace, reltype, reloftype, relowner, relam, \
        reltablespace, relpersistence, relkind, relnatts, relchecks, relrowsecurity, \
        relforcerowsecurity, relispopulated, relreplident, relispartition, relacl, reloptions, \
        relpartbound)::text as part from pg_class c where c.oid in (select oid from rel) \
    union all select 'attribute ' || (attrelid, attname, atttypid, attstattarget, attlen, attnum, \
        attndims, attbyval, attalign, attstorage, atttypmod, attnotnull, atthasdef, attidentity, \
        attgenerated, attisdropped, attislocal, attinhcount, attcollation, attacl, attoptions, \
        attfdwoptions)::text \
        from pg_attribute where attrelid >= 16384 and attrelid in (select oid from rel) \
    union all select 'namespace ' || n::text from pg_namespace n \
        where oid not in (select oid from hidden) \
    union all select 'built-in class ' || (oid, relacl, reloptions)::text from pg_class \
        where oid < 16384 and (relacl is not null or reloptions is not null) \
    union all select 'built-in function ' || (oid, proacl, proconfig)::text from pg_proc \
        where oid < 16384 and (proacl is not null or proconfig is not null) \
    union all select 'built-in type ' || (oid, typacl)::text from pg_type \
        where oid < 16384 and typacl is not null \
    union all select 'type ' || t::text from pg_type t \
        where oid >= 16384 and typnamespace not in (select oid from hidden) \
    union all select 'proc ' || p::text from pg_proc p where oid >= 16384 \
    union all select 'constraint ' || c::text from pg_constraint c \
        where oid >= 16384 and connamespace not in (select oid from hidden) \
    union all select 'index ' || i::text from pg_index i where indrelid >= 16384 and indrelid in (select oid from rel) \
    union all select 'attrdef ' || (adrelid, adnum, pg_get_expr(adbin, adrelid))::text \
        from pg_attrdef where adrelid >= 16384 and adrelid in (select oid from rel) \
    union all select 'trigger ' || t::text \
        from pg_trigger t where tgrelid >= 16384 and tgrelid in (select oid from rel) \
    union all select 'rewrite ' || (ev_class, rulename, ev_type, ev_enabled, is_instead, \
        ev_qual, ev_action)::text from pg_rewrite where ev_class >= 16384 and ev_class in (select oid from rel) \
    union all select 'policy ' || p::text from pg_policy p where polrelid >= 16384 and polrelid in (select oid from rel) \
    union all select 'sequence ' || s::text from pg_sequence s where seqrelid >= 16384 and seqrelid in (select oid from rel) \
    union all select 'inherits ' || i::text from pg_inherits i where inhrelid >= 16384 and inhrelid in (select oid from rel) \
    union all select 'enum ' || e::text from pg_enum e where oid >= 16384 \
    union all select 'extension ' || e::text from pg_extension e \
    union all select 'cast ' || c::text from pg_cast c where oid >= 16384 \
    union all select 'operator ' || o::text from pg_operator o where oid >= 16384 \
    union all select 'collation ' || c::text from pg_collation c where oid >= 16384 \
    union all select 'default acl ' || d::text from pg_default_acl d \
    union all select 'event trigger ' || e::text from pg_event_trigger e \
    union all select 'statistics ' || s::text \
        from pg_statistic_ext s where stxrelid >= 16384 and stxrelid in (select oid from rel) \
    union all select 'description ' || d::text from pg_description d \
        where (objoid >= 16384 or objoid = 2200) \
        and (classoid <> 'pg_class'::regclass or objoid in (select oid from rel)) \
    union all select 'depend ' || (classid, objid, objsubid, refclassid, refobjid, refobjsubid, \
        deptype)::text from pg_depend where objid >= 16384 \
        and (classid <> 'pg_class'::regclass or objid in (select oid from rel)) \
        and (classid <> 'pg_type'::regclass or objid not in (select oid from pg_type \
        where typnamespace in (select oid from hidden))) \
    union all select 'settings ' || s::text from pg_db_role_setting s, pg_database d \
        where s.setdatabase = d.oid and d.datname = current_database() \
    union all select 'ts config ' || c::text from pg_ts_config c \
    union all select 'ts config map ' || m::text from pg_ts_config_map m \
    union all select 'ts dictionary ' || d::text from pg_ts_dict d \
    union all select 'ts parser ' || p::text from pg_ts_parser p where oid >= 16384 \
    union all select 'ts template ' || t::text from pg_ts_template t where oid >= 16384 \
    union all select 'language ' || l::text from pg_language l \
    union all select 'access method ' || a::text from pg_am a \
    union all select 'operator class ' || o::text from pg_opclass o where oid >= 16384 \
    union all select 'operator family ' || o::text from pg_opfamily o where oid >= 16384 \
    union all select 'amop ' || o::text from pg_amop o where oid >= 16384 \
    union all select 'amproc ' || p::text from pg_amproc p where oid >= 16384 \
    union all select 'aggregate ' || a::text from pg_aggregate a where aggfnoid >= 16384 \
    union all select 'conversion ' || c::text from pg_conversion c where oid >= 16384 \
    union all select 'transform ' || t::text from pg_transform t \
    union all select 'range ' || r::text from pg_range r where rngtypid >= 16384 \
    union all select 'partitioned ' || p::text from pg_partitioned_table p where partrelid >= 16384 \
    union all select 'wrapper ' || w::text from pg_foreign_data_wrapper w \
    union all select 'server ' || f::text from pg_foreign_server f \
    union all select 'foreign table ' || f::text from pg_foreign_table f \
    union all select 'user mapping ' || u::text from pg_user_mapping u \
    union all select 'publication ' || p::text from pg_publication p \
    union all select 'publication rel ' || p::text from pg_publication_rel p \
    union all select 'init privs ' || i::text from pg_init_privs i where objoid >= 16384 \
    union all select 'database ' || (datdba, encoding, datistemplate, datallowconn, datconnlimit, \
        datacl)::text \
        from pg_database where datname = current_database() \
    ) parts";

/// The catalogs whose counts of rows inserted, updated and deleted a
/// reset reads: those the fingerprint reads. `pg_db_role_setting` is the
/// whole server's: an `ALTER … SET` anywhere moves its counts, and the
/// next reset computes the fingerprint.
pub(super) const COUNTED: [&str; 47] = [
    "pg_class",
    "pg_attribute",
    "pg_namespace",
    "pg_type",
    "pg_proc",
    "pg_constraint",
    "pg_index",
    "pg_attrdef",
    "pg_trigger",
    "pg_rewrite",
    "pg_policy",
    "pg_sequence",
    "pg_inherits",
    "pg_enum",
    "pg_extension",
    "pg_cast",
    "pg_operator",
    "pg_collation",
    "pg_default_acl",
    "pg_event_trigger",
    "pg_statistic_ext",
    "pg_description",
    // Every object made or dropped depends on something, whatever its
    // catalog.
    "pg_depend",
    "pg_ts_config",
    "pg_ts_config_map",
    "pg_ts_dict",
    "pg_ts_parser",
    "pg_ts_template",
    "pg_language",
    "pg_am",
    "pg_opclass",
    "pg_opfamily",
    "pg_amop",
    "pg_amproc",
    "pg_aggregate",
    "pg_conversion",
    "pg_transform",
    "pg_range",
    "pg_partitioned_table",
    "pg_foreign_data_wrapper",
    "pg_foreign_server",
    "pg_foreign_table",
    "pg_user_mapping",
    "pg_publication",
    "pg_publication_rel",
    "pg_init_privs",
    "pg_db_role_setting",
];

/// The database's own row, in the whole server's `pg_database`, which
/// every copy of a template writes: its counts cannot tell, the row is
/// looked at instead (whether it was written since the claim).
pub(super) const DATABASE_ROW: (&str, &str) = ("pg_database", "datname = current_database()");

/// Whether the rows `rows` of `catalog` hold one written after the
/// transaction `horizon`.
pub(super) fn written_in(catalog: &str, rows: &str, horizon: u32) -> String {
    format!("exists (select from {catalog} where {rows} and age(xmin) < age('{horizon}'::xid))")
}

/// The catalogs a test may write outside the catalog's fingerprint that
/// still change what the next test sees: large objects (their owners and
/// privileges, and their contents).
pub(super) const COUNTED_TOO: [&str; 2] = ["pg_largeobject_metadata", "pg_largeobject"];

/// What a database's large objects are, as text: `-` when it has none,
/// else a hash of each one's owner, privileges, comment and pages, each
/// page hashed on its own (reading them needs a superuser, as recycling
/// does). Comments: the fingerprint's leave out objects with oids below
/// those made after initdb, which a large object may have.
pub(super) const LARGE_OBJECTS: &str = "select coalesce(md5(string_agg(concat_ws(' ', \
        m.oid, m.lomowner, m.lomacl, quote_nullable(obj_description(m.oid, 'pg_largeobject')), \
        d.pageno, md5(d.data)), ',' order by m.oid, d.pageno)), '-') \
    from pg_largeobject_metadata m left join pg_largeobject d on d.loid = m.oid";

/// [`LARGE_OBJECTS`] where a fresh copy has none: whether there are any.
pub(super) const ANY_LARGE_OBJECTS: &str =
    "select case when exists (select from pg_largeobject_metadata) then 'some' else '-' end";

/// What [`LARGE_OBJECTS`] reads of a database with none.
pub(super) const NO_LARGE_OBJECTS: &str = "-";

/// The catalogs of statistics rows, counted apart: written (an `ANALYZE`)
/// without the schema changing, they only tell whether the statistics
/// rows are worth comparing.
pub(super) const STATISTICS_CATALOGS: [&str; 2] = ["pg_statistic", "pg_statistic_ext_data"];
