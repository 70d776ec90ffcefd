// A stand-in for libnvidia-ml.so.1 with one GPU, built by the NVML tests.
// Each function is compiled only when its macro is defined, so a test can
// build a library that lacks some of them, as a half-installed driver does.
#include <string.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
static int fake_device;

#ifdef HAVE_INIT
nvmlReturn_t nvmlInit_v2(void) { return 0; }
nvmlReturn_t nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(nvmlReturn_t r) { return r ? "fake error" : "Success"; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) { *n = NGPUS; return 0; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) { *d = &fake_device; return 0; }
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *s, unsigned int n) { strncpy(s, "Fake GPU", n); return 0; }
#endif
#ifdef HAVE_UUID
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *s, unsigned int n) { strncpy(s, "GPU-fake-0", n); return 0; }
#endif
#ifdef HAVE_DRIVER
nvmlReturn_t nvmlSystemGetDriverVersion(char *s, unsigned int n) { strncpy(s, "999.1", n); return 0; }
#endif
