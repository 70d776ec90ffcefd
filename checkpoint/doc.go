// Package checkpoint stores training checkpoints for gpumesh jobs, in S3
// (aws-sdk-go-v2, multipart and concurrent) or in a directory, so that a job
// preempted on one node resumes on others from the newest complete
// checkpoint.
//
// A Store holds whole objects: Upload makes an object visible whole or not at
// all, Download fetches one into an io.WriterAt. FileStore (file:///dir) and
// S3Store (s3://bucket/prefix) are its two implementations; Open picks one by
// URI.
//
// Checkpoints layers the commit protocol on a Store. One checkpoint is the
// training state at a step: one part per rank that saved (only rank 0, or
// every rank's shard), under
//
//	step-<step, 20 digits>/part-<rank, 5 digits>   the bytes of one rank
//	step-<step, 20 digits>/MANIFEST.json           written last
//
// A part is uploaded with its size and a CRC32C of every 16 MiB chunk (taken
// in parallel beside the upload of a file, or as a stream goes by); the
// manifest lists every part with both, and is written only after every
// listed part was found in the store with its size. A checkpoint exists once
// its manifest does: a writer that dies mid-upload leaves parts without a
// manifest, which Latest ignores, so the previous checkpoint stays the newest.
// Download checks each chunk as its bytes land, so a torn or swapped part is
// an error, never silent garbage. After a commit, Prune keeps the newest Keep
// checkpoints; it deletes a checkpoint's manifest before its parts, so a
// checkpoint is never seen half deleted, and removes leftovers of writes that
// never committed when they are older than the newest complete checkpoint.
//
// A manifest names the job that wrote it (Job, its ID; JobName, the name
// that stays the same when the job is submitted again). Owner.Check
// decides whether a job may resume from the newest checkpoint: a job of
// the same name may, another may only when it names that job in
// checkpoint.resume_from (else ErrOtherJob), and a manifest that names no
// job (written before names were recorded) is used with a warning.
//
// A rank writes its part once, into the file CreatePart hands out (the
// store's own temporary file for a FileStore, else a spool file that
// PartFile.Commit uploads); OpenPart gives a part back as a checked local
// file (a FileStore's own file, read once to check it, else a download) that
// the rank maps. Ranks reach this through their agent's local API
// (node/localapi's checkpoint connection, which python/gpumesh/checkpoint.py
// opens), or outside a gpumesh job through `gpumesh checkpoint
// put|commit|latest|get|list` (cmd/gpumesh). Zero padding of steps and ranks
// makes the lexical order of keys their numeric order.
package checkpoint
