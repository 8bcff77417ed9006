/* The kept vertex-buffer block of the fused mean field (mmap, reused between calls). */
/* ------------------------------------------------------------------ workspace */
/* The fused mean field's vertex buffers (tens of MB) are kept for the next call, up to
 * WS_KEEP bytes: fresh memory costs a page fault per 4 KB page on first touch (~1.6 us each on
 * the development VM, ~10 ms per 500x375 call).  One block, used by one call at a time (a
 * concurrent call maps its own); lattice_release_workspace unmaps it.  It is not asked for
 * transparent huge pages: on the development VM their first touch cost more (direct
 * compaction, ~60 ms more for the first 500x375 call, also slowing the next huge-page user)
 * than the TLB misses they spare. */
#include <sys/mman.h>

#define WS_KEEP ((size_t)256 << 20)

typedef struct {
    void *raw; /* page-aligned (mmap) */
    size_t len;
} ws_block_t;

static pthread_mutex_t ws_lock = PTHREAD_MUTEX_INITIALIZER;
static ws_block_t ws_kept;

static void ws_unmap(ws_block_t *b) {
    if (b->raw) munmap(b->raw, b->len);
    b->raw = NULL;
    b->len = 0;
}

static float *ws_data(const ws_block_t *b) { return (float *)b->raw; }

static int ws_map(ws_block_t *b, size_t bytes) {
    size_t len = bytes > 0 ? bytes : 1;
    void *raw = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return -1;
    b->raw = raw;
    b->len = len;
    return 0;
}

/* A block of at least `bytes` (page aligned) in *b; *kept says whether it is the kept one
 * (hand it back with ws_release) or the caller's own (ws_unmap it).  0, or -1 (no memory). */
static int ws_acquire(ws_block_t *b, size_t bytes, int *kept) {
    *kept = 0;
    if (bytes <= WS_KEEP && pthread_mutex_trylock(&ws_lock) == 0) {
        if (ws_kept.len < bytes) {
            ws_unmap(&ws_kept);
            if (ws_map(&ws_kept, bytes) != 0) {
                pthread_mutex_unlock(&ws_lock);
                return -1;
            }
        }
        *b = ws_kept;
        *kept = 1;
        return 0;
    }
    return ws_map(b, bytes);
}

static void ws_release(ws_block_t *b, int kept) {
    if (kept)
        pthread_mutex_unlock(&ws_lock);
    else
        ws_unmap(b);
}

/* Unmap the kept block (when no call is using it); returns the bytes released. */
int64_t lattice_release_workspace(void) {
    pthread_mutex_lock(&ws_lock);
    int64_t len = (int64_t)ws_kept.len;
    ws_unmap(&ws_kept);
    pthread_mutex_unlock(&ws_lock);
    return len;
}
