;; crasher: imports a function Solo does not grant (WASI's fd_write). Deploying it fails, and
;; the error names the import.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64) (i64.const 0)))
