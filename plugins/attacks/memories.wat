;; A core module that asks for many linear memories, and fills each: the
;; multi-memory attack. tests/all/sandbox.rs splices it, instantiated, into
;; the hostile plugin's component, so the component passes every check of
;; the contract while its instance holds the plugin's memory plus these.
;; With a per-memory cap each would pass; the host's cap is per instance.
(module
  (memory $a 0)
  (memory $b 0)
  (memory $c 0)
  (memory $d 0)
  (memory $e 0)
  (func $fill
    ;; 16 MiB (256 pages) each, touched so they are resident.
    (drop (memory.grow $a (i32.const 256)))
    (memory.fill $a (i32.const 0) (i32.const 1) (i32.const 16777216))
    (drop (memory.grow $b (i32.const 256)))
    (memory.fill $b (i32.const 0) (i32.const 1) (i32.const 16777216))
    (drop (memory.grow $c (i32.const 256)))
    (memory.fill $c (i32.const 0) (i32.const 1) (i32.const 16777216))
    (drop (memory.grow $d (i32.const 256)))
    (memory.fill $d (i32.const 0) (i32.const 1) (i32.const 16777216))
    (drop (memory.grow $e (i32.const 256)))
    (memory.fill $e (i32.const 0) (i32.const 1) (i32.const 16777216)))
  (start $fill))
