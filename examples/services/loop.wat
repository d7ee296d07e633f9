;; crasher: loops forever in every call. Its CPU limit stops it (a `cpu_limit` crash), and the
;; restart policy gives it a fresh instance.
(module
  (memory (export "memory") 1)
  (func (export "solo_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "solo_handle") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
