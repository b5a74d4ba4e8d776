//! The conformance suite, written once in `suite.rs` and stamped out here for every
//! backend this build has: SQLite always, PostgreSQL and MariaDB with their features
//! (PostgreSQL also through pgbouncer in transaction pooling, `WTH_PGBOUNCER_URL`),
//! and with `odbc` the same three through their ODBC drivers.

mod api;
mod bring;
mod env;
mod slices;
mod suite;

macro_rules! conformance {
    ($backend:ident, $env:expr, [$($module:ident::$test:ident),* $(,)?]) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::env::*;
            $(
                #[test]
                fn $test() {
                    let env = $env;
                    super::$module::$test(&env);
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($module:ident::$test:ident),* $(,)?) => {
        conformance!(sqlite, SqliteEnv::new(), [$($module::$test),*]);
        #[cfg(feature = "postgres")]
        conformance!(postgres, PgEnv::new(), [$($module::$test),*]);
        #[cfg(feature = "mysql")]
        conformance!(mysql, MyEnv::new(), [$($module::$test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_sqlite, OdbcEnv::sqlite(), [$($module::$test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_postgres, OdbcEnv::postgres(), [$($module::$test),*]);
        #[cfg(feature = "odbc")]
        conformance!(odbc_mysql, OdbcEnv::mysql(), [$($module::$test),*]);
        #[cfg(feature = "postgres")]
        conformance!(pgbouncer, PgEnv::pgbouncer(), [$($module::$test),*]);
        #[cfg(feature = "postgres")]
        conformance!(pgbouncer_coherent, Coherent(PgEnv::pgbouncer()), [$($module::$test),*]);
        conformance!(sqlite_coherent, Coherent(SqliteEnv::new()), [$($module::$test),*]);
        #[cfg(feature = "postgres")]
        conformance!(postgres_coherent, Coherent(PgEnv::new()), [$($module::$test),*]);
        #[cfg(feature = "mysql")]
        conformance!(mysql_coherent, Coherent(MyEnv::new()), [$($module::$test),*]);
    };
}

all_backends!(
    suite::basic_operations,
    suite::complex_keys_and_values,
    suite::custom_table_name,
    suite::initial_src_then_replace,
    suite::odd_table_names_are_quoted,
    suite::unusable_table_names_are_refused_before_writing,
    suite::keys_compare_byte_for_byte,
    suite::all_write_methods,
    suite::reads_are_hashmap_reads,
    suite::transactions_are_all_or_nothing,
    suite::server_rejection_rolls_back_everything,
    suite::failures_leave_memory_unchanged,
    suite::reload_sees_outside_changes,
    suite::undecodable_rows_are_errors,
    suite::wrong_layout_is_refused,
    suite::non_canonical_key_codec_is_caught,
    suite::codecs_and_column_types,
    suite::long_keys_are_refused_or_stored_whole,
    suite::bad_input_is_refused_cleanly,
    suite::random_operations_match_a_model,
    bring::equal_keys_in_one_batch_are_refused,
    bring::tables_that_do_not_keep_keys_apart_are_refused,
    bring::user_tables_that_keep_keys_apart_work,
    bring::key_kind_must_match_the_codec,
    bring::nul_in_text_is_kept_or_refused,
    bring::server_reasons_are_shown,
    bring::existing_tables_open_without_create_rights,
    bring::connections_in_any_state,
    bring::temporary_tables_that_hide_the_table_are_refused,
    bring::session_settings_do_not_change_what_is_stored,
    bring::keys_that_read_back_as_others_are_refused,
    bring::rows_dropped_by_the_table_are_errors,
    bring::deletes_dropped_by_the_table_are_errors,
    bring::deletes_skipped_by_a_trigger_are_errors,
    bring::tables_on_which_every_write_fails_are_refused,
    bring::a_refused_write_leaves_no_trace,
    api::read_modify_write,
    api::transaction_view_and_previous_values,
    api::errors_chain_each_cause_once,
    api::big_batches_are_all_or_nothing,
    api::a_codec_panic_in_a_big_batch_changes_nothing,
    api::store_without_a_map,
    slices::a_slice_holds_exactly_its_keys,
    slices::odd_prefixes_are_exact,
    slices::codecs_that_cannot_slice_are_refused,
    slices::rows_a_whole_open_refuses_are_refused_in_a_slice,
);
